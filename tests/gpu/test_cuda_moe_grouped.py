"""The grouped expert path on a CUDA device: PyTorch's grouped GEMM in bfloat16 (compute
capability 8.0 or newer) and the padded batched matmul in float32, against the full-weight path
and the plain per-expert loop of tests/unit/test_moe_grouped.py, forward and backward; and the
memory the grouped path saves at a larger expert shape. Skipped without CUDA."""

import pytest
import torch

import deltatune as dt
from deltatune.adapters.low_rank import moe_grouped
from expert_reference import expert_call, loop_reference
from tiny_models import randomize_adapter
from tiny_moe import EXPERT_TARGETS, MOE_ARCHS, tiny_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _layer(arch, dtype):
    model = tiny_moe(arch)
    dt.add_adapter(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=EXPERT_TARGETS))
    randomize_adapter(model)
    return model.to("cuda", dtype).model.layers[0].mlp.experts


def _run(layer, mode, hidden, index, weights):
    layer.compute = mode
    hidden = hidden.clone().requires_grad_(True)
    out = layer(hidden, index, weights)
    params = [p for n, p in layer.named_parameters() if "lora_" in n]
    grad = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda",
                       dtype=out.dtype)
    return out, torch.autograd.grad(out, [hidden, *params], grad)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_grouped_equals_full_weight_on_cuda(arch, dtype, rel):
    layer = _layer(arch, dtype)
    hidden, index, weights = (t.cuda() for t in expert_call(layer, tokens=64))
    hidden, weights = hidden.to(dtype), weights.to(dtype)
    full = _run(layer, "full", hidden, index, weights)
    grouped = _run(layer, "grouped", hidden, index, weights)
    assert layer.last_path[0] == "grouped"
    for got, ref in zip((grouped[0], *grouped[1]), (full[0], *full[1])):
        scale = max(ref.float().abs().max().item(), 1.0)
        assert (got.float() - ref.float()).abs().max().item() <= rel * scale
    if dtype == torch.float32:
        loop = loop_reference(layer, ["default"], hidden, index, weights)
        assert (grouped[0] - loop).abs().max().item() <= 1e-5 * max(loop.abs().max().item(), 1.0)


def test_bf16_takes_the_grouped_gemm_where_the_device_has_one():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("grouped GEMM needs compute capability 8.0")
    w = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(10, 64, device="cuda", dtype=torch.bfloat16)
    assert moe_grouped.grouped_mm_usable(x, w)
    assert not moe_grouped.grouped_mm_usable(x.double(), w.double())


def test_grouped_path_saves_the_weight_copy():
    """At 64 experts x (2·512) x 1024 the full-weight path holds an extra weight and its gradient;
    the grouped path holds token-sized tensors only."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=128, hidden_size=1024, num_hidden_layers=1, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=128, moe_intermediate_size=512, num_experts=64,
                            num_experts_per_tok=8, intermediate_size=2048)
    model = Qwen3MoeForCausalLM(config).to("cuda", torch.bfloat16)
    dt.add_adapter(model, dt.LoraConfig(r=16, target_modules=[], target_parameters=EXPERT_TARGETS))
    ids = torch.randint(0, 128, (2, 256), device="cuda")
    peaks = {}
    for mode in ("full", "grouped"):
        for layer in (m for m in model.modules() if hasattr(m, "compute")):
            layer.compute = mode
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(ids).logits.float().sum().backward()
        peaks[mode] = torch.cuda.max_memory_allocated() - before
        model.zero_grad(set_to_none=True)
    weight_bytes = 64 * 1024 * 1024 * 2  # gate_up's adapted copy alone, bf16
    assert peaks["full"] - peaks["grouped"] >= weight_bytes, peaks
