"""The fused LoRA ops against the plain PyTorch reference: forward output and every gradient
(input, base weight and bias when trainable, A, B, LoRA bias), with and without dropout."""

import math

import pytest
import torch
import torch.nn.functional as F

from deltatune.kernels import lora_add, lora_linear
from deltatune.kernels.sparse_dropout import SPARSE_LIMIT, dropped_positions


def reference(x, weight, bias, A, B, lora_bias, scale, keep_mask, transposed=False):
    """``x Wᵀ + b + scale·B A (x ⊙ mask / (1-p)) + scale·lora_bias`` with composed ops."""
    W = weight.T if transposed else weight
    base = F.linear(x, W, bias)
    dropped = x if keep_mask is None else x * keep_mask
    out = base + F.linear(F.linear(dropped, A), B) * scale
    return out if lora_bias is None else out + lora_bias * scale


def keep_mask_for(seed, shape, p, device="cpu"):
    """The mask the fused op draws after ``torch.manual_seed(seed)``, scaled by 1/(1-p)."""
    if p == 0:
        return None
    torch.manual_seed(seed)
    numel, width = math.prod(shape), shape[-1]
    if p <= SPARSE_LIMIT:
        keep = torch.ones(numel, dtype=torch.float64)
        keep[dropped_positions(numel, p, torch.device(device))] = 0
        keep = keep.view(-1, width)
    else:
        keep = torch.empty(numel // width, width, dtype=torch.bool).bernoulli_(1 - p).double()
    return (keep / (1 - p)).view(shape)


def make(shape, d_in, d_out, r, dtype, bias, lora_bias, base_grad=False, transposed=False):
    g = torch.Generator().manual_seed(1)

    def t(*s, grad=True):
        return torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)

    x = t(*shape, d_in)
    weight = t(*((d_in, d_out) if transposed else (d_out, d_in)), grad=base_grad)
    b = t(d_out, grad=base_grad) if bias else None
    A, B = t(r, d_in), t(d_out, r)
    lb = t(d_out) if lora_bias else None
    return x, weight, b, A, B, lb


def grads(out, tensors, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, [t for t in tensors if t is not None and t.requires_grad], g)


def assert_matches(fused, ref, tensors, tol: float, grad_tol: float) -> None:
    """``fused`` equals ``ref``, and so do their gradients with respect to ``tensors``."""
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol)
    for got, want in zip(grads(fused, tensors), grads(ref, tensors)):
        torch.testing.assert_close(got, want, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.2, 0.5])
@pytest.mark.parametrize("bias,lora_bias,transposed,base_grad", [
    (True, False, False, False), (False, True, False, False), (True, True, True, False), (True, False, False, True)])
def test_lora_linear_matches_reference(p, bias, lora_bias, transposed, base_grad):
    x, weight, b, A, B, lb = make((3, 17), 24, 20, 4, torch.float64, bias, lora_bias, base_grad, transposed)
    torch.manual_seed(7)
    fused = lora_linear(x, weight, b, A, B, lb, 0.75, p, transposed=transposed)
    mask = keep_mask_for(7, x.shape, p)
    ref = reference(x, weight, b, A, B, lb, 0.75, mask, transposed)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    tensors = (x, weight, b, A, B, lb)
    for got, want in zip(grads(fused, tensors), grads(ref, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.6])
def test_lora_add_matches_reference(p):
    x, weight, b, A, B, lb = make((2, 5, 9), 16, 12, 3, torch.float64, True, True)
    base = F.linear(x, weight, b)
    torch.manual_seed(11)
    fused = lora_add(x, base, A, B, lb, 2.0, p)
    ref = reference(x, weight, b, A, B, lb, 2.0, keep_mask_for(11, x.shape, p))
    assert_matches(fused, ref, (x, A, B, lb), 1e-12, 1e-12)


def test_float32_and_autocast_bfloat16():
    x, weight, b, A, B, lb = make((4, 8), 32, 48, 8, torch.float32, True, False)
    fused = lora_linear(x, weight, b, A, B, lb, 0.5, 0.0)
    torch.testing.assert_close(fused, reference(x, weight, b, A, B, lb, 0.5, None), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = lora_linear(x, weight, b, A, B, lb, 0.5, 0.0)
        ref = reference(x, weight, b, A, B, lb, 0.5, None)
    assert fast.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for got, want in zip(grads(fast.float(), (x, A, B)), grads(ref.float(), (x, A, B))):
        assert got.dtype == torch.float32  # gradients reach the float32 master weights
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


def test_lora_add_promotes_like_adding_the_outputs():
    x, weight, b, A, B, lb = make((2, 3), 8, 8, 2, torch.float32, False, False)
    result = F.linear(x, weight).to(torch.bfloat16)
    out = lora_add(x, result, A, B, None, 1.0, 0.0)
    assert out.dtype == (result + F.linear(F.linear(x, A), B)).dtype == torch.float32


@pytest.mark.parametrize("p", [0.01, 0.05, 0.25])
def test_dropped_positions_are_a_bernoulli_process(p):
    torch.manual_seed(0)
    numel = 200_000
    pos = dropped_positions(numel, p, torch.device("cpu"))
    assert pos.min() >= 0 and pos.max() < numel and bool((pos[1:] > pos[:-1]).all())  # sorted, distinct
    sd = math.sqrt(numel * p * (1 - p))
    assert abs(len(pos) - numel * p) < 5 * sd  # the count is Binomial(numel, p)
    # each position independently: the two halves and the even/odd positions get equal shares
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[pos] = True
    for part in (mask[: numel // 2], mask[numel // 2:], mask[0::2], mask[1::2]):
        assert abs(int(part.sum()) - len(part) * p) < 5 * math.sqrt(len(part) * p * (1 - p))
    # neighbours are uncorrelated: P(both dropped) ≈ p²
    both = int((mask[1:] & mask[:-1]).sum())
    assert abs(both - (numel - 1) * p * p) < 5 * math.sqrt(numel * p * p) + 5


def test_dropped_positions_follow_the_seed_and_refuse_bad_probabilities():
    torch.manual_seed(5)
    first = dropped_positions(1000, 0.1, torch.device("cpu"))
    torch.manual_seed(5)
    assert torch.equal(first, dropped_positions(1000, 0.1, torch.device("cpu")))
    # small tensors still cover their whole range (the draw is repeated until it does)
    torch.manual_seed(0)
    assert len(dropped_positions(3, 0.2, torch.device("cpu"))) <= 3
    with pytest.raises(ValueError, match="dropout probability"):
        dropped_positions(10, 1.0, torch.device("cpu"))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_dora_weight_norm_matches_the_formed_sum(dtype, tol):
    from deltatune.kernels import dora_weight_norm

    g = torch.Generator().manual_seed(0)
    weight, A, B = (torch.randn(*s, generator=g, dtype=dtype) for s in ((40, 24), (6, 24), (40, 6)))
    want = torch.linalg.norm(weight.double() + 0.7 * (B.double() @ A.double()), dim=1)
    torch.testing.assert_close(dora_weight_norm(weight, A, B, 0.7).double(), want, rtol=tol, atol=tol)


def test_dora_norm_is_kept_until_a_factor_changes(monkeypatch):
    import deltatune as dt
    from deltatune import kernels
    from tiny_models import randomize_adapter, sample_ids, tiny_model

    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    randomize_adapter(model)
    calls = []
    real = kernels.dora_weight_norm
    monkeypatch.setattr(kernels, "dora_weight_norm", lambda *a: calls.append(1) or real(*a))
    layers = len(model.model.layers)
    model.train()
    model(sample_ids()).logits.sum().backward()
    model(sample_ids()).logits.sum().backward()  # a second micro-batch: the same factors, no new norm
    assert len(calls) == layers
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)  # what an optimizer step does (in place)
    model(sample_ids())
    assert len(calls) == 2 * layers
    layer = model.model.layers[0].self_attn.q_proj
    dt.delete_adapter(model, "default")  # a later adapter of the same name never meets an old norm
    assert "default" not in layer._dora_norms


def test_dropout_draws_repeat_under_gradient_checkpointing():
    """Checkpointing recomputes the forward in backward: the dropped positions must be drawn again
    identically, or the gradients would belong to another mask."""
    import deltatune as dt
    from tiny_models import randomize_adapter, sample_ids, tiny_model

    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
        randomize_adapter(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(123)
        ids = sample_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


@pytest.mark.parametrize("bias,zero_magnitude", [(False, False), (True, False), (True, True)])
def test_dora_add_matches_the_composed_form(bias, zero_magnitude):
    from deltatune.kernels import dora_add

    x, weight, b, A, B, _ = make((3, 7), 12, 10, 3, torch.float64, bias, False, base_grad=bias)
    magnitude = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    if zero_magnitude:
        magnitude[3] = 0.0
    magnitude.requires_grad_(True)
    norm = torch.linalg.norm(weight + 0.8 * B @ A, dim=1).detach()  # a constant, as DoRA treats it
    result = F.linear(x, weight, b)
    fused = dora_add(x, result, b, A, B, magnitude, norm, 0.8)
    factor = magnitude / norm
    result = F.linear(x, weight, b)  # a graph of its own for the reference
    base_part = result if b is None else result - b
    ref = result + (factor - 1) * base_part + factor * (F.linear(F.linear(x, A), B) * 0.8)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    tensors = (x, weight, b, A, B, magnitude)
    for got, want in zip(grads(fused, tensors), grads(ref, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_a_base_that_does_more_than_a_linear_keeps_its_own_forward():
    """A subclass of nn.Linear with its own forward, or a hook on the base, is never replaced by
    the fused op: the layer calls the base and adds the adapter after it."""
    import deltatune as dt
    from deltatune.adapters.low_rank.lora import LoraLinear

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(Doubled(8, 8, bias=False))
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    assert isinstance(layer, LoraLinear) and layer._single_fused_adapter() is None
    x = torch.randn(3, 8)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + F.linear(F.linear(x, A), B) * layer.scaling["default"]
    torch.testing.assert_close(model(x), expected)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    dt.add_adapter(plain, dt.LoraConfig(r=2, target_modules=["0"]))
    assert plain[0]._single_fused_adapter() == "default"
    plain[0].base_layer.register_forward_hook(lambda *args: None)
    assert plain[0]._single_fused_adapter() is None
