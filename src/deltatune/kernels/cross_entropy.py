"""Cross-entropy fused with the output projection, in row chunks: the full logits never exist.

A causal LM's loss usually materialises ``tokens × vocabulary`` logits, a float32 copy of them,
their log-softmax and, in backward, a gradient of the same size: four passes over the largest
activation of the step. This op walks the rows in chunks; for each chunk it computes the
logits, the loss and (when a gradient will be needed) the gradient with respect to the hidden
states and, if trainable, the projection weight, then drops the chunk. Backward only scales
what forward kept. The plain PyTorch definition (``F.linear`` + ``F.cross_entropy``) is the
ground truth the tests hold it to.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dtypes import cast_all, compute_dtype

CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB in float32)


def _loss_and_grads(hidden, weight, bias, targets, want_h: bool, want_w: bool, want_b: bool):
    """Summed loss, and the unscaled gradients that are wanted, chunk by chunk."""
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk]
        t = targets[start:start + chunk]
        logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).float()
        lse = torch.logsumexp(logits, dim=1)
        total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
        if not (want_h or want_w or want_b):
            continue
        probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
        probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d(loss_i)/d(logits_i)
        if want_h:
            grad_h[start:start + chunk] = probs.to(weight.dtype) @ weight
        if want_w:
            grad_w.addmm_(probs.T, h.float())
        if want_b:
            grad_b += probs.sum(0)
    return total, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        want_b = bias is not None and ctx.needs_input_grad[2]
        total, grad_h, grad_w, grad_b = _loss_and_grads(hidden, weight, bias, targets, ctx.needs_input_grad[0],
                                                        ctx.needs_input_grad[1], want_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype, ctx.rows = weight.dtype, hidden.shape[0]
        return total / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss / ctx.rows
        out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        out_b = (grad_b * scale).to(ctx.weight_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor) -> torch.Tensor:
    """Mean of ``cross_entropy(hidden @ weightᵀ + bias, targets)`` over the rows of ``hidden``
    (n, H), with ``weight`` (V, H). Logits are computed in ``weight``'s dtype (autocast's under
    autocast) and reduced in float32, as a causal LM's own loss does; ``n = 0`` gives NaN, like
    ``F.cross_entropy``."""
    if hidden.shape[0] == 0:
        return hidden.new_full((), float("nan"), dtype=torch.float32)
    cast = cast_all(compute_dtype(weight), hidden, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in cast)):
            return _loss_and_grads(*cast, targets, False, False, False)[0] / hidden.shape[0]  # evaluation
        return _LinearCrossEntropy.apply(*cast, targets)
