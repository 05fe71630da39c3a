"""DoRA with dropout as one op (``kernels.dora_dropout_add``) against the composed form, with the
same dropout draw: forward output and the gradients of the input, the base bias, A, B and the
magnitude; and the layer choosing it in training."""

import pytest
import torch
import torch.nn.functional as F

from deltatune.kernels import dora_dropout_add
from test_lora_kernels import assert_matches, keep_mask_for, make


def composed(x, weight, bias, A, B, magnitude, norm, scale, keep_mask):
    """HF PEFT's DoRA with dropout: ``result + (f − 1)·W d(x) + f·s·B A d(x)``."""
    result = F.linear(x, weight, bias)
    dropped = x * keep_mask
    factor = magnitude / norm
    return result + (factor - 1) * F.linear(dropped, weight) + factor * F.linear(F.linear(dropped, A), B) * scale


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
def test_dora_dropout_add_matches_the_composed_form(p, bias, sparse, monkeypatch):
    """Both ways of the base term over the dropped-out input: through the dropped elements only
    (CPU) and as a dense matmul over the zeroed input (GPU, half precision, dense masks)."""
    from deltatune.kernels import dora_dropout

    if not sparse:
        monkeypatch.setattr(dora_dropout, "_sparse_path", lambda x2, drop: False)
    x, weight, b, A, B, _ = make((4, 9), 12, 10, 3, torch.float64, bias, False)
    if b is not None:
        b.requires_grad_(True)  # a trainable base bias gets its gradient through the op too
    magnitude = (torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5)
    magnitude.requires_grad_(True)
    norm = torch.linalg.norm(weight + 0.8 * B @ A, dim=1).detach()
    torch.manual_seed(21)
    fused = dora_dropout_add(x, F.linear(x, weight, b), b, weight, A, B, magnitude, norm, 0.8, p)
    ref = composed(x, weight, b, A, B, magnitude, norm, 0.8, keep_mask_for(21, x.shape, p))
    assert_matches(fused, ref, (x, b, A, B, magnitude), 1e-12, 1e-10)


def test_dora_dropout_add_refuses_what_it_cannot_do():
    x, weight, _, A, B, _ = make((2, 3), 6, 5, 2, torch.float64, False, False)
    norm, magnitude = torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="dropout_p"):
        dora_dropout_add(x, x @ weight.T, None, weight, A, B, magnitude, norm, 1.0, 0.0)
    with pytest.raises(ValueError, match="frozen"):
        dora_dropout_add(x, x @ weight.T, None, weight.requires_grad_(True), A, B, magnitude, norm, 1.0, 0.1)


def test_a_dora_layer_in_training_uses_the_fused_op_and_keeps_the_composed_result(monkeypatch):
    """A DoRA layer with dropout in training runs ``dora_dropout_add``; with the same draw its
    output and gradients equal the composed form's."""
    import deltatune as dt
    from deltatune import kernels

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["0"], use_dora=True, lora_dropout=0.1,
                                        init_lora_weights=False))
    layer = model[0]
    calls = []
    original = kernels.dora_dropout_add
    monkeypatch.setattr(kernels, "dora_dropout_add", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.train()
    x = torch.randn(5, 16, requires_grad=True)
    torch.manual_seed(9)
    out = model(x)
    assert calls, "the fused DoRA-with-dropout op was not used"
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude, base = layer.lora_magnitude_vector["default"].weight, layer.base_layer
    norm = torch.linalg.norm(base.weight + layer.scaling["default"] * B @ A, dim=1).detach()
    ref = composed(x, base.weight, base.bias, A, B, magnitude, norm, layer.scaling["default"],
                   keep_mask_for(9, x.shape, 0.1).float())
    assert_matches(out, ref, (x, A, B, magnitude), 1e-5, 1e-4)


def test_under_bfloat16_autocast_it_runs_in_bfloat16_near_the_float32_result():
    x, weight, b, A, B, _ = make((4, 9), 16, 12, 3, torch.float32, True, False)
    magnitude = torch.rand(12, generator=torch.Generator().manual_seed(4)) + 0.5
    norm = torch.linalg.norm(weight + 0.8 * B @ A, dim=1).detach()
    torch.manual_seed(5)
    want = dora_dropout_add(x, F.linear(x, weight, b), b, weight, A, B, magnitude, norm, 0.8, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(5)
        got = dora_dropout_add(x, F.linear(x, weight, b), b, weight, A, B, magnitude, norm, 0.8, 0.1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.15)
    got.float().sum().backward()
    assert A.grad.dtype == torch.float32 and torch.isfinite(A.grad).all()
