"""PEFT parity for OSF: the frozen SVD parts (recomputed from the base weight, never saved) are
PEFT's bit for bit, files loaded both ways give the same logits, the files carry PEFT's keys,
shapes, dtypes and config fields, one backward step gives PEFT's projected gradients, merging
matches PEFT's merged model (deltatune also unmerges exactly; PEFT cannot), and deltatune's training
loop steps with gradients orthogonal to the frozen subspaces. PEFT's OSF wraps nn.Linear only and
leaves GPT-2's Conv1D alone (an empty adapter): deltatune refuses GPT-2, so no GPT-2 logits cases."""

import copy
import weakref

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import deltatune as dt
from deltatune.adapters.orthogonal.osf import OsfLinear
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5

# case -> (architecture, fields given to both tools); the trained factors are randomised by the tests
CASES = {
    # the defaults: OSF's table (the seven projections), half of each layer's smaller side frozen
    "osf-defaults-llama": ("llama", dict()),
    "osf-fraction-pattern-qwen2": ("qwen2", dict(target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                                                 effective_rank=0.25,
                                                 rank_pattern={"down_proj": 20, r"layers\.1\.self_attn\.q_proj": 0.75,
                                                               "mlp": 3})),
    "osf-int-all-linear-llama": ("llama", dict(target_modules="all-linear", effective_rank=5)),
    "osf-modules-to-save-qwen2": ("qwen2", dict(target_modules=["v_proj", "up_proj", "o_proj"], effective_rank=12,
                                                modules_to_save=["lm_head"])),
}


def _peft_model(base, case):
    return peft.get_peft_model(copy.deepcopy(base), peft.OSFConfig(**copy.deepcopy(CASES[case][1])))


def _dt_model(base, case):
    return dt.add_adapter(copy.deepcopy(base), dt.OSFConfig(**copy.deepcopy(CASES[case][1])))


def _our_layers(model):
    return {k: m for k, m in model.named_modules() if isinstance(m, OsfLinear)}


def _frozen_bases(layer, name="default"):
    """(U basis, U spans the complement?, V basis, V spans the complement?) as the layer projects."""
    u_high, v_high = name in layer.osf_U_high, name in layer.osf_V_high
    return (layer.osf_U_high[name] if u_high else layer.osf_U0[name], not u_high,
            layer.osf_V_high[name] if v_high else layer.osf_V0[name], not v_high)


def _projected(dU, dV, layer):
    """PEFT's projection of raw gradients, in its formulas."""
    U, u_complement, V, v_complement = _frozen_bases(layer)
    pu = U @ (U.T @ dU) if u_complement else dU - U @ (U.T @ dU)
    pv = (dV @ V.T) @ V if v_complement else dV - (dV @ V.T) @ V
    return pu, pv


def _orthogonality_error(layer, name="default") -> float:
    """How far the gradients of U_low and V_low are from the frozen subspaces' complement,
    relative to their size (0 for an exact projection)."""
    p = layer.osf_svd_params[name]
    dU, dV = p["U_low"].grad, p["V_low"].grad
    pu, pv = _projected(dU, dV, layer)
    scale = max(dU.abs().max().item(), dV.abs().max().item(), 1e-30)
    return max((pu - dU).abs().max().item(), (pv - dV).abs().max().item()) / scale


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
def test_files_have_peft_keys_shapes_dtypes_values_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs_model, ours_model = _peft_model(base, case), _dt_model(base, case)
    ours, theirs = assert_same_files(theirs_model, ours_model, tmp_path, CASES[case][1])
    factors = [k for k in theirs if ".osf_svd_params." in k]
    assert factors and {k.rsplit(".", 1)[1] for k in factors} == {"U_low", "S_low", "V_low"}
    assert set(theirs) - set(factors) <= {"base_model.model.lm_head.weight"}  # modules_to_save only
    for key in theirs:  # a new adapter's factors are the SVD's, bit for bit
        assert torch.equal(ours[key], theirs[key]), key
    # the recomputed frozen parts are PEFT's bits (signs included), and the high parts are kept where PEFT keeps them
    mine = _our_layers(ours_model)
    checked = 0
    for key, module in theirs_model.named_modules():
        if not hasattr(module, "_osf_U_low_init"):
            continue
        layer = mine[key.removeprefix("base_model.model.")]
        for ours_holder, their_holder in ((layer.osf_U0, module._osf_U_low_init), (layer.osf_S0, module._osf_S_low_init),
                                          (layer.osf_V0, module._osf_V_low_init), (layer.osf_U_high, module._osf_U_high),
                                          (layer.osf_V_high, module._osf_V_high)):
            assert set(ours_holder.keys()) == set(their_holder.keys()), key
            for name in their_holder.keys():
                assert torch.equal(ours_holder[name], their_holder[name]), key
        assert layer.effective_rank["default"] == module.effective_rank["default"], key
        checked += 1
    assert checked == len(mine) > 0
    if case == "osf-fraction-pattern-qwen2":  # patterns are searched anywhere in the name, first match wins
        ranks = {k: layer.effective_rank["default"] for k, layer in mine.items()}
        assert ranks["model.layers.0.mlp.down_proj"] == 20 and ranks["model.layers.0.mlp.gate_proj"] == 3
        assert ranks["model.layers.1.self_attn.q_proj"] == 24 and ranks["model.layers.0.self_attn.q_proj"] == 8


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_model_equals_peft_merged_and_unmerge_is_exact(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: merged, deltatune vs PEFT"] = merged_vs_peft_merged(base, theirs, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft_and_are_projected(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-6, rtol=1e-5, nonzero=True)
    layers = _our_layers(ours)
    assert layers and max(_orthogonality_error(layer) for layer in layers.values()) < 1e-5


def test_projection_really_removes_a_component(tmp_path):
    """PEFT without its hooks gives the raw gradients: deltatune's are their projection, and differ from them."""
    base, ids = tiny_model("llama"), sample_ids()
    fields = dict(target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"], effective_rank=6)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OSFConfig(**fields))
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    for module in theirs.modules():
        if hasattr(module, "_detach_hooks"):
            module._detach_hooks()
    for m in (theirs, ours):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    raw = {k.removeprefix("base_model.model."): m for k, m in theirs.named_modules() if hasattr(m, "_osf_U_high")}
    for key, layer in _our_layers(ours).items():
        their = raw[key].osf_svd_params["default"]
        pu, pv = _projected(their["U_low"].grad, their["V_low"].grad, layer)
        mine = layer.osf_svd_params["default"]
        torch.testing.assert_close(mine["U_low"].grad, pu, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mine["V_low"].grad, pv, atol=1e-6, rtol=1e-5)
        removed = max((pu - their["U_low"].grad).abs().max(), (pv - their["V_low"].grad).abs().max())
        assert removed > 1e-3 * their["U_low"].grad.abs().max(), key  # a real component was taken out


def test_a_bfloat16_base_gives_peft_s_float32_tensors_logits_and_projected_gradients(tmp_path):
    """On a half-precision base PEFT upcasts the factors to float32 by replacing the parameters, which
    drops its projection hooks: its gradients come raw. deltatune projects there too; its gradients
    equal PEFT's projected by PEFT's formulas."""
    base = tiny_model("llama").to(torch.bfloat16)
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], effective_rank=0.5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OSFConfig(**fields))
    ours_new = dt.add_adapter(copy.deepcopy(base), dt.OSFConfig(**fields))
    ours_file, theirs_file = assert_same_files(theirs, ours_new, tmp_path, fields)
    assert all(v.dtype == torch.float32 for v in ours_file.values())
    assert all(torch.equal(ours_file[k], theirs_file[k]) for k in theirs_file)
    randomize_adapter(theirs)
    loaded = load_peft_file(base, theirs, tmp_path / "random", trainable=True)
    ids = sample_ids()
    assert (eval_logits(loaded, ids).float() - eval_logits(theirs, ids).float()).abs().max() <= 1e-2
    for m in (theirs, loaded):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    raw = {k.removeprefix("base_model.model."): m for k, m in theirs.named_modules() if hasattr(m, "_osf_U_high")}
    for key, layer in _our_layers(loaded).items():
        their = raw[key].osf_svd_params["default"]
        pu, pv = _projected(their["U_low"].grad, their["V_low"].grad, layer)
        mine = layer.osf_svd_params["default"]
        torch.testing.assert_close(mine["U_low"].grad, pu, atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(mine["V_low"].grad, pv, atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(mine["S_low"].grad, their["S_low"].grad, atol=1e-5, rtol=1e-3)  # never projected


def test_training_loop_steps_with_projected_gradients(tmp_path, default_tokenizer):
    """``deltatune train --method osf``: at every optimizer step (after clipping, before the update)
    each OSF layer's U_low/V_low gradients lie in the complement of its frozen subspaces. Observed
    through PyTorch's global module-forward and optimizer-step hooks; the loop itself knows nothing
    of OSF."""
    from deltatune.train import load_config, train
    from tiny_models import tiny_chat_model_dir, word_meaning_data

    model_dir = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    seen: "weakref.WeakSet[OsfLinear]" = weakref.WeakSet()
    errors: list[float] = []
    layers: list[int] = []  # OSF layers alive at each step (the model is gone once train returns)

    def on_forward(module, args, output):
        if isinstance(module, OsfLinear):
            seen.add(module)

    def before_step(optimizer, args, kwargs):
        layers.append(len(seen))
        for layer in seen:
            if layer.osf_svd_params["default"]["U_low"].grad is not None:
                errors.append(_orthogonality_error(layer))

    handles = [torch.nn.modules.module.register_module_forward_hook(on_forward),
               register_optimizer_step_pre_hook(before_step)]
    try:
        summary = train(load_config(None, {"model": str(model_dir), "data.path": str(data), "batch_size": 4,
                                           "grad_accum": 2, "max_steps": 3, "eval_steps": 3, "seed": 3, "lr": 1e-3,
                                           "method": "osf", "output_dir": str(tmp_path / "out")}),
                        log=lambda *_: None)
    finally:
        for handle in handles:
            handle.remove()
    assert layers == [14, 14, 14]  # 3 steps; 2 blocks x the seven projections
    assert len(errors) == 3 * 14 and max(errors) < 1e-5
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]


def test_init_weights_false_is_not_a_no_op_and_loads_in_peft(tmp_path):
    base = tiny_model("llama")
    fields = dict(target_modules=["q_proj", "v_proj"], effective_rank=4, init_weights=False)
    torch.manual_seed(0)
    ours = dt.add_adapter(copy.deepcopy(base), dt.OSFConfig(**fields))
    ids = sample_ids()
    assert (eval_logits(ours, ids) - eval_logits(base, ids)).abs().max() > 1e-2
    dt.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (eval_logits(theirs, ids) - eval_logits(ours, ids)).abs().max() <= ATOL


def test_starts_as_the_base_and_trains_only_the_low_factors():
    base, ids = tiny_model("llama"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.OSFConfig())
    assert (eval_logits(model, ids) - eval_logits(base, ids)).abs().max() <= 1e-6  # cancels up to rounding
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".osf_svd_params.default." in n for n in trainable)
    # per block: q, o (32x32): 32·16 + 16 + 16·32; k, v (16x32): 16·8 + 8 + 8·32; gate, up, down (64/32): 1552 each
    assert dt.trainable_parameters(model)[0] == 2 * (2 * 1040 + 2 * 392 + 3 * 1552) == 15040

