"""The mixture-of-experts parts of ``deltatune bench`` that need no subprocess: the FLOP count of
grouped GEMMs, which shapes count as MoE, and the named MoE shapes' configs."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deltatune.bench.moe import MOE_SHAPES, is_moe_shape, moe_config
from deltatune.bench.worker import _extra_flop_formulas

grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@pytest.mark.skipif(grouped_mm is None, reason="this PyTorch has no grouped GEMM")
def test_grouped_gemm_counts_forward_and_both_gradients():
    tokens, k, n = 10, 16, 32
    x = torch.randn(tokens, k, requires_grad=True)
    w = torch.randn(3, k, n, requires_grad=True)
    offsets = torch.tensor([3, 7, 10], dtype=torch.int32)  # groups of 3, 4 and 3 rows
    with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
        y = grouped_mm(x, w, offs=offsets)
        y.register_hook(lambda g: g.contiguous())  # the grouped GEMM's backward refuses expanded gradients
        y.sum().backward()
    # forward, input gradient and weight gradient: each row meets one (k, n) matrix once
    assert counter.get_total_flops() == 3 * 2 * tokens * k * n


def test_moe_shapes_are_recognised(tmp_path):
    assert is_moe_shape("qwen3-moe-cpu") and not is_moe_shape("llama-1b") and not is_moe_shape("default")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 8}))
    assert is_moe_shape(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_moe_shape(str(tmp_path))


def test_qwen3_30b_a3b_layer_shape():
    config = moe_config("qwen3-30b-a3b-2l")
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (2048, 32, 4, 128)
    assert (config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok) == (768, 128, 8)
    assert (config.vocab_size, config.tie_word_embeddings, config.num_hidden_layers) == (151936, False, 2)
    assert set(MOE_SHAPES) == {"qwen3-30b-a3b-2l", "qwen3-moe-cpu"}
