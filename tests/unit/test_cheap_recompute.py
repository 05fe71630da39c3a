"""Rebuilding norm outputs and MLP gates in backward: fewer saved bytes, the same bits."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.train.recompute import CheapRecompute, cheap_recompute
from tiny_models import sample_ids, tiny_model


def _lora_model(arch: str, dropout: float = 0.1):
    model = dt.add_adapter(tiny_model(arch), dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                           target_modules="all-linear"))
    model.train()
    return model


def _step(model, ids, recompute: bool):
    """Loss, adapter gradients and the bytes of distinct storages autograd saved."""
    state = cheap_recompute(model) if recompute else None
    saved: dict = {}

    def count(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(5)  # the same dropout draws in both runs
    if state:  # only the innermost hooks run: count what the recompute hooks keep as tensors
        pack = state.pack
        state.pack = lambda t: count(pack(t))
        context = state.saving()
    else:
        context = torch.autograd.graph.saved_tensors_hooks(count, lambda t: t)
    with context:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    if state:
        state.remove()
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_recompute_changes_no_bit_and_saves_fewer_bytes(arch):
    model = _lora_model(arch)
    ids = sample_ids(batch=2, length=12)
    loss, grads, plain_bytes = _step(model, ids, recompute=False)
    loss_r, grads_r, lean_bytes = _step(model, ids, recompute=True)
    assert torch.equal(loss, loss_r)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_r[name]), name
    assert lean_bytes < 0.85 * plain_bytes, (lean_bytes, plain_bytes)


def test_norms_are_checked_and_hooks_removed():
    model = _lora_model("llama")
    state = cheap_recompute(model)
    with state.saving():
        model(input_ids=sample_ids(batch=2, length=12), labels=sample_ids(batch=2, length=12)).loss.backward()
    recorded_modules = [m for m, ok in state.checked.items() if ok]
    assert len(recorded_modules) >= 2 * 2 + 1  # two norms per layer and the final norm reproduce
    state.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_a_module_that_does_not_reproduce_its_output_is_not_rebuilt():
    model = _lora_model("llama", dropout=0.0)
    norm = model.model.layers[0].input_layernorm
    calls = {"n": 0}

    def noisy(module, args, output):  # a forward hook that changes the output: rerunning .forward differs
        calls["n"] += 1
        return output + 1e-3

    norm.register_forward_hook(noisy)
    ids = sample_ids(batch=2, length=12)
    loss, grads, _ = _step(model, ids, recompute=False)
    loss_r, grads_r, _ = _step(model, ids, recompute=True)
    assert torch.equal(loss, loss_r)
    for name in grads:
        assert torch.equal(grads[name], grads_r[name]), name


def test_an_input_changed_in_place_after_forward_is_an_error():
    model = _lora_model("llama", dropout=0.0)
    state = cheap_recompute(model)
    kept = {}
    layer = model.model.layers[0]
    layer.post_attention_layernorm.register_forward_hook(lambda m, args, out: kept.update(h=args[0]))
    with state.saving():
        loss = model(input_ids=sample_ids(batch=2, length=12), labels=sample_ids(batch=2, length=12)).loss
    with torch.no_grad():
        kept["h"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        loss.backward()


def test_a_kept_tensor_changed_in_place_is_still_an_error():
    """Tensors that pass through the hooks lose autograd's own in-place check; the hooks keep it."""
    x = torch.randn(4, 3, requires_grad=True)
    state = CheapRecompute()
    with state.saving():
        y = x * 2
        z = (y * y).sum()  # saves y
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        z.backward()
