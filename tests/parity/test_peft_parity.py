"""Parity with the pinned ``peft``: files, logits both ways, and gradients of one backward step."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

CASES = {
    "lora-llama": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "lora-qwen2-all-linear": ("qwen2", dict(target_modules="all-linear", lora_dropout=0.1)),
    "rslora-patterns-qwen2": ("qwen2", dict(target_modules="all-linear", use_rslora=True,
                                            rank_pattern={"k_proj": 2, "layers.1.mlp.up_proj": 6},
                                            alpha_pattern={"o_proj": 5})),
    "dora-gemma": ("gemma", dict(target_modules="all-linear", use_dora=True)),
    "dora-llama-embedding": ("llama", dict(target_modules=["embed_tokens", "o_proj"], use_dora=True)),
    "lora-gemma-embedding": ("gemma", dict(target_modules=["embed_tokens", "v_proj"])),
    "modules-to-save-llama": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "layers-to-transform-qwen2": ("qwen2", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                                layers_pattern="layers")),
    "conv1d-gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "dora-conv1d-gpt2-bias": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                           use_dora=True, bias="lora_only")),
    "embedding-gpt2": ("gpt2", dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "lora-t5-seq2seq": ("t5", dict(target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")),
    "dora-t5-all-linear": ("t5", dict(target_modules="all-linear", use_dora=True, task_type="SEQ_2_SEQ_LM")),
}
# float32 on CPU: both sides run the same matmuls; DoRA's norm is computed slightly differently.
ATOL = 1e-5


def _peft_model(base, kwargs):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                    **kwargs))


def _dt_model(base, kwargs):
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    arch, kwargs = CASES[case]
    base = tiny_model(arch)
    theirs = _peft_model(base, kwargs)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path)
    ids = sample_ids()
    expected = eval_logits(theirs, ids)
    assert (expected - eval_logits(base, ids)).abs().max() > 1e-2  # the adapter really changes the output
    diff = (eval_logits(ours, ids) - expected).abs().max().item()
    parity_results[f"{case}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    arch, kwargs = CASES[case]
    base = tiny_model(arch)
    ours = _dt_model(base, kwargs)
    randomize_adapter(ours, seed=7)
    dt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ids = sample_ids()
    expected = eval_logits(ours, ids)
    assert (expected - eval_logits(base, ids)).abs().max() > 1e-2
    diff = (eval_logits(theirs, ids) - expected).abs().max().item()
    parity_results[f"{case}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_and_config_fields(case, tmp_path):
    arch, kwargs = CASES[case]
    base = tiny_model(arch)
    _peft_model(base, kwargs).save_pretrained(tmp_path / "theirs")
    dt.save_adapter(_dt_model(base, kwargs), tmp_path / "ours")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    for key in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora",
                "modules_to_save", "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out", "peft_type"):
        mine, other = our_cfg[key], their_cfg[key]
        if isinstance(other, list) and isinstance(mine, list):
            mine, other = sorted(mine), sorted(other)
        assert mine == other, key


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    arch, kwargs = CASES[case]
    kwargs = {k: v for k, v in kwargs.items() if k != "lora_dropout"}  # dropout masks would differ
    base = tiny_model(arch)
    theirs = _peft_model(base, kwargs)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    dt.load_adapter(ours, tmp_path, trainable=True)
    ids = sample_ids()
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    their_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-4, msg=name)
