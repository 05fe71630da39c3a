"""PEFT parity for the methods beside LoRA: files loaded both ways give the same logits, the
files carry PEFT's keys, shapes and config fields, and one backward step gives PEFT's gradients."""

import copy

import pytest
import torch

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            peft_file_to_deltatune)
from tiny_models import randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

# case -> (architecture, config class name (the same in PEFT and deltatune), fields)
CASES = {
    "loha-llama": ("llama", "LoHaConfig", dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8)),
    "loha-qwen2-patterns": ("qwen2", "LoHaConfig", dict(target_modules="all-linear", r=4, alpha=6,
                                                        rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3})),
    "lokr-llama": ("llama", "LoKrConfig", dict(target_modules=["q_proj", "down_proj"], r=4, alpha=8)),
    "lokr-decompose-both-llama": ("llama", "LoKrConfig", dict(target_modules=["q_proj", "down_proj", "up_proj"],
                                                              r=2, decompose_both=True)),
    "lokr-factor-qwen2": ("qwen2", "LoKrConfig", dict(target_modules=["v_proj", "gate_proj"], r=8,
                                                      decompose_factor=4)),
    "ia3-llama": ("llama", "IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                             feedforward_modules=["down_proj"])),
    "ia3-gpt2": ("gpt2", "IA3Config", dict(target_modules=["c_attn", "mlp.c_proj"],
                                           feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True,
                                           init_ia3_weights=False)),
    "ia3-t5": ("t5", "IA3Config", dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"],
                                       task_type="SEQ_2_SEQ_LM")),
    "vera-llama": ("llama", "VeraConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4)),
    "vera-no-projection-qwen2": ("qwen2", "VeraConfig", dict(target_modules=["q_proj", "v_proj"], r=6,
                                                             save_projection=False, projection_prng_key=7)),
    "vera-gpt2": ("gpt2", "VeraConfig", dict(target_modules=["c_attn", "c_fc"], r=16, fan_in_fan_out=True)),
    # trained biases travel in the file (PEFT saves them for every tuner's bias option)
    "adalora-bias-qwen2": ("qwen2", "AdaLoraConfig", dict(target_modules=["q_proj", "v_proj", "up_proj"], init_r=4,
                                                          target_r=2, total_step=10, bias="lora_only")),
    "adalora-all-biases-gpt2": ("gpt2", "AdaLoraConfig", dict(target_modules=["c_attn"], init_r=4, target_r=2,
                                                              total_step=10, bias="all", fan_in_fan_out=True)),
}
ATOL = 1e-5


def _peft_model(base, case):
    _, cls, kwargs = CASES[case]
    extra = {"IA3Config": {"init_ia3_weights": False}, "VeraConfig": {},
             "AdaLoraConfig": {"init_lora_weights": False}}.get(cls, {"init_weights": False})
    extra = {k: v for k, v in extra.items() if k not in kwargs}
    return peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs, **extra))


def _dt_model(base, case):
    _, cls, kwargs = CASES[case]
    model = copy.deepcopy(base)
    dt.add_adapter(model, getattr(dt, cls)(**kwargs))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    ours, theirs = assert_same_files(_peft_model(base, case), _dt_model(base, case), tmp_path, CASES[case][2])
    if "save_projection" not in CASES[case][2] and CASES[case][1] == "VeraConfig":
        # the seeded projections are PEFT's values, not just its shapes
        assert torch.equal(ours["base_model.vera_A"], theirs["base_model.vera_A"])
        assert torch.equal(ours["base_model.vera_B"], theirs["base_model.vera_B"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-6, rtol=1e-4)


# task_type matters: without one, PEFT's PeftModel.forward skips AdaLoraModel.forward, where PEFT
# adds the orthogonality penalty to the loss; with CAUSAL_LM both sides train with the penalty.
ADALORA = dict(target_modules=["q_proj", "v_proj", "up_proj"], init_r=6, target_r=2, total_step=6, tinit=1,
               tfinal=2, deltaT=1, lora_alpha=8, orth_reg_weight=0.5, task_type="CAUSAL_LM")


def _sgd_steps(model, ids, after_step, penalty=None):
    """Six steps in PEFT's documented order: backward, update, re-allocate ranks, zero the gradients.

    ``penalty`` (deltatune) adds the method's loss penalty as deltatune's training loop does; PEFT
    adds its own inside forward. Returns the loss of each step."""
    losses = []
    for step in range(1, 7):
        loss = model(input_ids=ids, labels=ids).loss
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.grad is not None:
                    p -= 0.1 * p.grad
        after_step(step)
        model.zero_grad(set_to_none=True)
    return losses


def test_adalora_rank_allocation_and_files_match_peft(tmp_path, parity_results):
    from deltatune.adapters.method import method_for
    from deltatune.adapter_ops import get_state

    base, ids = tiny_model("llama"), sample_ids()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**ADALORA))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path / "start")
    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path / "start", trainable=True)  # the same starting values
    config = get_state(ours).configs["default"]
    method = method_for(config)
    assert config.orth_reg_weight == 0.5
    # the penalty is really there on both sides: PEFT's loss exceeds the plain model loss by it
    with torch.no_grad():
        their_loss = theirs(input_ids=ids, labels=ids).loss
        plain_loss = ours(input_ids=ids, labels=ids).loss
        penalty = method.loss_penalty(ours, "default", config)
    assert penalty is not None and penalty.item() > 1e-3
    torch.testing.assert_close(their_loss - plain_loss, penalty, atol=1e-5, rtol=1e-5)
    their_losses = _sgd_steps(theirs, ids, theirs.base_model.update_and_allocate)
    our_losses = _sgd_steps(ours, ids, lambda step: method.after_step(ours, "default", config, step),
                            penalty=lambda: method.loss_penalty(ours, "default", config))
    assert our_losses == pytest.approx(their_losses, abs=1e-5, rel=1e-5)

    their_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert config.rank_pattern == their_pattern
    kept = [sum(v) for v in config.rank_pattern.values()]
    assert sum(kept) == 2 * len(kept) and min(kept) < 6  # the budget (target_r per layer) was met by pruning
    theirs.eval(), ours.eval()
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= ATOL
    assert_same_files(theirs, ours, tmp_path,
                      ("rank_pattern", "init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "lora_alpha"))
    # each side loads the other's pruned file to the same logits
    back_in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    back_in_ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    with torch.no_grad():
        expected = ours(ids).logits
        d1 = (back_in_peft(ids).logits - expected).abs().max().item()
        d2 = (back_in_ours(ids).logits - expected).abs().max().item()
    parity_results["adalora-llama: deltatune file -> PEFT"] = d1
    parity_results["adalora-llama: PEFT file -> deltatune"] = d2
    assert d1 <= ATOL and d2 <= ATOL
