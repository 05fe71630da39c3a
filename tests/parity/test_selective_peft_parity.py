"""PEFT parity for LN tuning, trainable tokens and LoRA's ``trainable_token_indices``: files loaded
both ways give the same logits, the files carry PEFT's keys, shapes, dtypes and config fields, one
backward step gives PEFT's gradients, and merging matches PEFT's merged model (unmerge exact)."""

import copy

import pytest
import torch

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            peft_file_to_deltatune, peft_name)
from tiny_models import _config, eval_logits, sample_ids, tiny_model

peft = pytest.importorskip("peft")

TOKENS = [16, 94, 127, 126, 101, 82]  # ids that occur in sample_ids(), so their rows matter

# case -> (architecture, config class name (the same in PEFT and deltatune), fields)
CASES = {
    "tokens-llama": ("llama", "TrainableTokensConfig", dict(token_indices=TOKENS)),
    "tokens-qwen2-named": ("qwen2", "TrainableTokensConfig", dict(token_indices=TOKENS[:3],
                                                                  target_modules=["embed_tokens"])),
    "tokens-gpt2-tied": ("gpt2", "TrainableTokensConfig", dict(token_indices=TOKENS)),
    "tokens-llama-tied": ("llama-tied", "TrainableTokensConfig", dict(token_indices=[5, 16, 94])),
    "tokens-t5-shared": ("t5", "TrainableTokensConfig", dict(token_indices=TOKENS)),  # 3 modules share the rows
    "tokens-gemma-tied": ("gemma", "TrainableTokensConfig", dict(token_indices=TOKENS[:3])),
    "ln-llama": ("llama", "LNTuningConfig", {}),
    "ln-t5": ("t5", "LNTuningConfig", {}),
    "ln-qwen2": ("qwen2", "LNTuningConfig", {}),
    "ln-gpt2": ("gpt2", "LNTuningConfig", {}),
    "ln-llama-named": ("llama", "LNTuningConfig", dict(target_modules=["input_layernorm", "norm"],
                                                      exclude_modules=["model.layers.0.input_layernorm"])),
    "lora-tokens-llama": ("llama", "LoraConfig", dict(target_modules=["q_proj", "v_proj"], r=4,
                                                      trainable_token_indices=TOKENS)),
    "lora-tokens-gpt2-tied": ("gpt2", "LoraConfig", dict(target_modules=["c_attn"], r=4,
                                                         trainable_token_indices=TOKENS[:4])),
    "lora-tokens-qwen2-dict": ("qwen2", "LoraConfig", dict(target_modules=["q_proj"], r=4, trainable_token_indices={
        "embed_tokens": TOKENS[:3], "lm_head": [7, 16, 40, 90]})),
    "lora-tokens-llama-tied-dict": ("llama-tied", "LoraConfig", dict(target_modules=["k_proj"], r=4,
                                                                     trainable_token_indices={
                                                                         "embed_tokens": [16, 94],
                                                                         "lm_head": [16, 94]})),
}
ATOL = 1e-5


def _base(arch: str) -> torch.nn.Module:
    if arch != "llama-tied":
        return tiny_model(arch)
    cls, config = _config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = cls(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random trainable values, large enough that every case visibly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _fields(case):
    _, cls, kwargs = CASES[case]
    extra = {"init_lora_weights": False} if cls == "LoraConfig" else {}
    return cls, {**kwargs, **extra}


def _peft_model(base, case):
    cls, kwargs = _fields(case)
    return peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs))


def _dt_model(base, case):
    cls, kwargs = _fields(case)
    model = copy.deepcopy(base)
    dt.add_adapter(model, getattr(dt, cls)(**kwargs))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = _base(CASES[case][0])
    theirs = _peft_model(base, case)
    _randomize(theirs, 2)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = _base(CASES[case][0])
    ours = _dt_model(base, case)
    _randomize(ours, 7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_dtypes_and_config_fields(case, tmp_path):
    base = _base(CASES[case][0])
    ours, theirs = assert_same_files(_peft_model(base, case), _dt_model(base, case), tmp_path,
                                     ("target_modules", *CASES[case][2]))
    if CASES[case][1] != "LoraConfig":  # both start from the base's own rows / norms
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = _base(CASES[case][0])
    theirs = _peft_model(base, case)
    _randomize(theirs, 2)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)

    def name(n):  # PEFT's LoRA keeps the rows in a wrapper's token_adapter
        return peft_name(n).replace(".token_adapter", "")

    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-6, rtol=1e-4, their_name=name, our_name=name,
                          nonzero=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_peft_and_unmerge_is_exact(case, tmp_path, parity_results):
    base, ids = _base(CASES[case][0]), sample_ids()
    ours = _dt_model(base, case)
    _randomize(ours, 7)
    dt.save_adapter(ours, tmp_path)
    tuned = eval_logits(ours, ids)
    merged_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).merge_and_unload()
    dt.merge(ours, verbose=False)
    merged = eval_logits(ours, ids)
    diff = (merged - eval_logits(merged_by_peft, ids)).abs().max().item()
    parity_results[f"{case}: merged, deltatune vs PEFT"] = diff
    assert diff <= ATOL
    dt.unmerge(ours)
    assert torch.equal(eval_logits(ours, ids), tuned)
    with dt.disable_adapters(ours):
        assert torch.equal(eval_logits(ours, ids), eval_logits(base, ids))
    # (merged and unmerged differ by float rounding, up to 1e-4 where big random LoRA factors
    # are folded into GPT-2's weights, in PEFT as here; the merged models agree, above)
    plain = dt.unload(copy.deepcopy(ours), merge=True, verbose=False)
    torch.testing.assert_close(eval_logits(plain, ids), merged, atol=ATOL, rtol=0)


def test_bad_token_choices_are_refused_by_name():
    with pytest.raises(ValueError, match="TrainableTokensConfig.token_indices must be a non-empty list"):
        dt.TrainableTokensConfig()
    with pytest.raises(ValueError, match=r"names token id\(s\) \[5\] more than once"):
        dt.TrainableTokensConfig(token_indices=[5, 7, 5])
    with pytest.raises(ValueError, match="non-negative integer token ids"):
        dt.LoraConfig(trainable_token_indices={"embed_tokens": [1, -2]})
    with pytest.raises(ValueError, match="AdaLoraConfig.trainable_token_indices is not supported"):
        dt.AdaLoraConfig(trainable_token_indices=[1, 2], total_step=10)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="token id 500 is out of range: the embedding has 128 rows"):
        dt.add_adapter(model, dt.TrainableTokensConfig(token_indices=[3, 500]))
    assert not hasattr(model, "deltatune_state") and type(model.model.embed_tokens) is torch.nn.Embedding
    with pytest.raises(TypeError, match="module 'model.norm': trainable tokens wrap an embedding"):
        dt.add_adapter(model, dt.TrainableTokensConfig(token_indices=[3], target_modules=["model.norm"]))
    with pytest.raises(ValueError, match="in modules_to_save .* and in trainable_token_indices"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                            trainable_token_indices=[3]))
    with pytest.raises(ValueError, match="'wte' matches no module"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"wte": [3]}))
    with pytest.raises(TypeError, match="one method per module"):  # LoRA on the embedding and rows of it
        dt.add_adapter(model, dt.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[3]))
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in tiny_model("llama").named_parameters()}


def test_two_token_adapters_switch_route_and_merge(tmp_path):
    """Two adapters on one embedding (and the tied head): switching, per-row routing and merging one."""
    base, ids = _base("llama-tied"), sample_ids()
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.TrainableTokensConfig(token_indices=[16, 94]), "a")
    dt.add_adapter(model, dt.TrainableTokensConfig(token_indices=[127, 3]), "b")
    _randomize(model, 3)
    single = {}
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        single[name] = eval_logits(model, ids)
    with dt.adapter_per_row(model, ["b", None, "a"]):
        routed = eval_logits(model, ids)
    # rows computed in a batch of other shapes sum in another order: float32 rounding, not a wrong row
    torch.testing.assert_close(routed[0], single["b"][0], atol=1e-5, rtol=0)
    assert torch.equal(routed[1], eval_logits(base, ids)[1])
    torch.testing.assert_close(routed[2], single["a"][2], atol=1e-5, rtol=0)
    dt.set_adapter(model, "a")
    dt.merge(model, verbose=False)
    assert model.model.embed_tokens.base_layer.weight is not model.lm_head.base_layer.weight  # merged privately
    torch.testing.assert_close(eval_logits(model, ids), single["a"], atol=1e-5, rtol=0)
    dt.unmerge(model)
    assert model.model.embed_tokens.base_layer.weight is model.lm_head.base_layer.weight  # tied again
    assert torch.equal(eval_logits(model, ids), single["a"])


def test_padding_row_gets_no_gradient_as_in_peft(tmp_path):
    base = tiny_model("llama")  # padding_idx 0
    ids = torch.cat([sample_ids(), torch.zeros(3, 2, dtype=torch.long)], dim=1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=[0, 16, 94]))
    _randomize(theirs, 2)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    grads = []
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(next(p.grad for p in model.parameters() if p.requires_grad))
    assert torch.equal(grads[1][0], torch.zeros_like(grads[1][0])) and grads[1][1:].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
