"""A DyLoRA adapter cut to rank b is a LoRA adapter PEFT loads: the same logits as deltatune's
adapter running at rank b, on several architectures (embeddings, Conv1D, rsLoRA, patterns)."""

import copy

import pytest
import torch

import deltatune as dt
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

CASES = {
    "llama-all-linear": ("llama", dict(target_modules="all-linear")),
    "qwen2-rslora-patterns": ("qwen2", dict(target_modules="all-linear", use_rslora=True,
                                            rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 5})),
    "gpt2-conv1d-embedding": ("gpt2", dict(target_modules=["wte", "c_attn", "c_proj"], fan_in_fan_out=True)),
    "gemma-embedding": ("gemma", dict(target_modules=["embed_tokens", "v_proj", "down_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_a_cut_dylora_adapter_loads_in_peft_with_equal_logits(case, rank, tmp_path, parity_results):
    arch, kwargs = CASES[case]
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.DyLoraConfig(r=6, lora_alpha=12, **kwargs))
    randomize_adapter(model)
    dt.save_adapter(model, tmp_path, rank=rank)
    dt.set_adapter_rank(model, rank)
    ids = sample_ids()
    ours = eval_logits(model, ids)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(eval_logits(theirs, ids), ours, atol=1e-5, rtol=1e-5)
    parity_results[f"dylora-{case}-r{rank}: deltatune cut -> PEFT"] = (eval_logits(theirs, ids) - ours).abs().max().item()
    assert (ours - eval_logits(base, ids)).abs().max() > 1e-3  # the adapter does change the model
