"""The fast paths of 4-bit layers give the reference's values: reused CPU buffers for the weight a
matmul rebuilds, and QDoRA's norm from the layer's own matmul instead of a dequantized weight."""

import pytest
import torch

import deltatune as dt
from deltatune import kernels, quant
from deltatune.quant.blockwise import dequantize_4bit, quantize_4bit
from tiny_models import saved_tiny_llama_64


@pytest.mark.parametrize("shape", [(64, 96), (5, 7), (3, 130)])  # whole bytes, a half byte, a partial block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reused_buffer_gives_the_same_values(shape, dtype):
    torch.manual_seed(0)
    packed, state = quantize_4bit(torch.randn(*shape), "nf4", 64, True)
    fresh = dequantize_4bit(packed, state, dtype)
    reused = dequantize_4bit(packed, state, dtype, reuse=True)
    assert reused.dtype == dtype and reused.shape == shape
    assert torch.equal(reused, fresh)


def test_reused_buffer_is_reused_and_not_the_plain_result():
    torch.manual_seed(0)
    packed, state = quantize_4bit(torch.randn(128, 64), "nf4", 64, True)
    first = dequantize_4bit(packed, state, reuse=True)
    pointer, values = first.data_ptr(), first.clone()
    second = dequantize_4bit(packed, state, reuse=True)
    assert second.data_ptr() == pointer  # no new allocation of the weight
    assert torch.equal(second, values)
    plain = dequantize_4bit(packed, state)
    assert plain.data_ptr() != pointer  # what callers may keep is their own tensor
    other_packed, other_state = quantize_4bit(torch.randn(128, 64), "nf4", 64, True)
    dequantize_4bit(other_packed, other_state, reuse=True)
    assert torch.equal(plain, values)


def test_layer_output_and_gradient_with_reused_buffers_equal_dense():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=True)
    layer = quant.Linear4bit.from_linear(linear)
    dense = layer.to_linear()
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    y, y_dense = layer(x), dense(x_dense)
    assert torch.equal(y, y_dense)
    y.square().sum().backward()
    y_dense.square().sum().backward()
    assert torch.allclose(x.grad, x_dense.grad, rtol=1e-6, atol=1e-6)


def _qdora_model(tmp_path):
    folder = saved_tiny_llama_64(tmp_path / "base")
    model, _ = dt.load_model(folder, quantize="nf4")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False))
    return model


def test_qdora_norm_from_the_layer_matmul_equals_the_norm_of_the_dequantized_sum(tmp_path):
    model = _qdora_model(tmp_path)
    layers = [m for m in model.modules() if hasattr(m, "_dora_norm") and m.quantized]
    assert layers
    for layer in layers:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        weight = layer.base_layer.dequantize(torch.float64)
        expected = torch.linalg.norm(weight + layer.scaling["default"] * (B.double() @ A.double()), dim=1)
        assert torch.allclose(layer._dora_norm("default").double(), expected, rtol=1e-5, atol=1e-6)


def test_qdora_forms_each_weight_once_not_per_step(tmp_path):
    model = _qdora_model(tmp_path)
    layers = [m.base_layer for m in model.modules() if hasattr(m, "_dora_norm") and m.quantized]
    calls = {"n": 0}
    for base in layers:
        original = base.dequantize

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)
        base.dequantize = counted
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 64, (2, 12))
    for _ in range(3):  # three optimizer steps, two micro-batches each
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # once per layer, for ||W_i||²; the matmuls decode the weight without handing it out
    assert calls["n"] == len(layers)


def test_norm_from_product_equals_norm_from_weight():
    torch.manual_seed(0)
    weight, A, B = torch.randn(24, 40), torch.randn(4, 40), torch.randn(24, 4)
    rows = kernels.weight_row_norms_sq(weight)
    assert torch.allclose(kernels.dora_norm_from_product(weight @ A.T, A, B, 0.5, rows),
                          kernels.dora_weight_norm(weight, A, B, 0.5))
