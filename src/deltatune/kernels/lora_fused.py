"""A LoRA linear layer as one autograd function: ``y = x Wᵀ + b + s · B A dropout(x) + s · b_B``.

What the composed PyTorch ops (``kernels.reference``, HF PEFT) spend and this op does not:

- a dense random mask: dropout draws only the dropped positions (``sparse_dropout``), about
  5% of the input's size at p = 0.05, and the dropped-out input is rebuilt from them for the
  two rank-r matmuls that read it instead of being kept between the passes;
- the scaled low-rank output and the sum with the base output as separate tensors: the
  low-rank product is added into the base output in place (``addmm_``);
- the separate input gradients of the base and the low-rank path and their sum: one
  ``addmm`` builds both;
- saved activations: only the input (shared with the other layers reading it), the rank-r
  product and the dropped positions are kept for backward.

``lora_linear`` owns the base matmul (dense, frozen base weight); ``lora_add`` adds an adapter
to an output computed elsewhere (a quantized base, a second adapter, a routed row group).
Both work on any device; the tests hold them to ``kernels.reference`` forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dtypes import cast_all, compute_dtype
from .sparse_dropout import SPARSE_LIMIT, dropped_positions


class _Dropout:
    """The dropout draw of one call: sparse positions, a dense mask, or nothing."""

    def __init__(self, p: float, flat: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        self.p, self.flat, self.mask = p, flat, mask
        self.keep = 1.0 / (1.0 - p) if p > 0 else 1.0

    @classmethod
    def draw(cls, x2: torch.Tensor, p: float) -> "_Dropout":
        """A new draw for the input ``x2``: sparse positions up to ``SPARSE_LIMIT``, a dense mask above."""
        if 0 < p <= SPARSE_LIMIT:
            return cls(p, flat=dropped_positions(x2.numel(), p, x2.device))
        if p > SPARSE_LIMIT:
            return cls(p, mask=torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - p))
        return cls(p)

    def tensors(self) -> list:
        """What backward needs to rebuild this draw (``_Dropout(p, *tensors)``)."""
        return [self.flat, self.mask]

    def zeroed(self, t: torch.Tensor, copy: bool) -> torch.Tensor:
        """``t`` with the dropped elements set to zero (unscaled), a copy when ``copy``."""
        if self.mask is not None:
            return t * self.mask if copy else t.mul_(self.mask)
        if self.flat is None:
            return t
        t = t.clone() if copy else t
        t.view(-1).index_fill_(0, self.flat, 0)
        return t

    def low_rank_input(self, x2: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``dropout(x) Aᵀ`` without the ``keep`` factor (the caller applies it in its epilogue).
        The dropped-out input lives only for this matmul; backward rebuilds it."""
        return self.zeroed(x2, copy=True) @ A.T

    def grad_A(self, gh: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``ghᵀ dropout(x)`` for gradient ``gh`` of the rank-r product."""
        grad = gh.T @ self.zeroed(x2, copy=True)
        return grad.mul_(self.keep) if self.p > 0 else grad

    def add_grad_x(self, grad_x: Optional[torch.Tensor], gh: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``grad_x + dropout'(gh A)``; in place when ``grad_x`` is given."""
        if self.p == 0:
            return gh @ A if grad_x is None else grad_x.addmm_(gh, A)
        lora = self.zeroed(gh @ A, copy=False)
        return lora.mul_(self.keep) if grad_x is None else grad_x.add_(lora, alpha=self.keep)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with dropout ``p`` drawn as the fused ops draw it (the same positions for the same
    seed), for paths that compose their own ops."""
    x2 = x.reshape(-1, x.shape[-1])
    drop = _Dropout.draw(x2, p)
    dropped = drop.zeroed(x2, copy=True)
    return (dropped * drop.keep if p > 0 else dropped).view(x.shape)


def _lora_backward(ctx, g2, x2, A, B, h, drop: _Dropout, base_grad_x):
    """Gradients of the low-rank part; returns (grad_x, grad_A, grad_B, grad_lora_bias)."""
    scale = ctx.scale
    gh = (g2 @ B).mul_(scale)  # d loss / d (dropout(x) Aᵀ)
    grad_A = drop.grad_A(gh, x2) if ctx.needs_input_grad[ctx.a_index] else None
    grad_B = (g2.T @ h).mul_(scale * drop.keep) if ctx.needs_input_grad[ctx.a_index + 1] else None
    grad_lb = g2.sum(0).mul_(scale) if ctx.has_lora_bias and ctx.needs_input_grad[ctx.a_index + 2] else None
    grad_x = drop.add_grad_x(base_grad_x, gh, A) if ctx.needs_input_grad[0] else None
    return grad_x, grad_A, grad_B, grad_lb


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, lora_bias, scale: float, p: float, transposed: bool):
        x2 = x.reshape(-1, x.shape[-1])
        W_t = weight if transposed else weight.T  # (in, out)
        out = torch.addmm(bias, x2, W_t) if bias is not None else x2 @ W_t
        drop = _Dropout.draw(x2, p)
        h = drop.low_rank_input(x2, A)
        out.addmm_(h, B.T, alpha=scale * drop.keep)
        if lora_bias is not None:
            out.add_(lora_bias, alpha=scale)
        ctx.scale, ctx.p, ctx.transposed, ctx.a_index = scale, p, transposed, 3
        ctx.has_lora_bias, ctx.has_bias = lora_bias is not None, bias is not None
        ctx.save_for_backward(x2, weight, A, B, h, *drop.tensors())
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, A, B, h, *saved = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        drop = _Dropout(ctx.p, *saved)
        W_t = weight if ctx.transposed else weight.T  # (in, out)
        base_grad_x = g2 @ W_t.T if ctx.needs_input_grad[0] else None
        grad_x, grad_A, grad_B, grad_lb = _lora_backward(ctx, g2, x2, A, B, h, drop, base_grad_x)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = x2.T @ g2 if ctx.transposed else g2.T @ x2
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None if grad_x is None else grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_b, grad_A, grad_B, grad_lb, None, None, None


class _LoraAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, result, A, B, lora_bias, scale: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])
        r2 = result.reshape(-1, result.shape[-1])
        drop = _Dropout.draw(x2, p)
        h = drop.low_rank_input(x2, A)
        out = torch.addmm(r2, h, B.T, alpha=scale * drop.keep)
        if lora_bias is not None:
            out.add_(lora_bias, alpha=scale)
        ctx.scale, ctx.p, ctx.a_index = scale, p, 2
        ctx.has_lora_bias = lora_bias is not None
        ctx.save_for_backward(x2, A, B, h, *drop.tensors())
        ctx.x_shape = x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2, A, B, h, *saved = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x, grad_A, grad_B, grad_lb = _lora_backward(ctx, g2, x2, A, B, h, _Dropout(ctx.p, *saved), None)
        grad_x = None if grad_x is None else grad_x.view(ctx.x_shape)
        grad_result = grad_out if ctx.needs_input_grad[1] else None
        return grad_x, grad_result, grad_A, grad_B, grad_lb, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, lora_bias: Optional[torch.Tensor], scale: float, dropout_p: float,
                transposed: bool = False) -> torch.Tensor:
    """``x Wᵀ + b + scale · B A dropout(x) + scale · lora_bias``, forward and backward in one op.

    ``weight`` is (out, in), or (in, out) with ``transposed`` (GPT-2's Conv1D); A is (r, in),
    B is (out, r). ``dropout_p`` is 0 outside training. Under autocast every operand is cast
    to autocast's dtype, as ``F.linear`` would be; gradients flow back to the stored dtypes.
    """
    cast = cast_all(compute_dtype(x), x, weight, bias, A, B, lora_bias)
    if dropout_p == 0 and not torch.is_grad_enabled():  # inference: the forward's ops, no autograd node
        x, weight, bias, A, B, lora_bias = cast
        x2 = x.reshape(-1, x.shape[-1])
        W_t = weight if transposed else weight.T
        out = torch.addmm(bias, x2, W_t) if bias is not None else x2 @ W_t
        out.addmm_(x2 @ A.T, B.T, alpha=float(scale))
        if lora_bias is not None:
            out.add_(lora_bias, alpha=float(scale))
        return out.view(*x.shape[:-1], out.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(*cast, float(scale), float(dropout_p), transposed)


def lora_add(x: torch.Tensor, result: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             lora_bias: Optional[torch.Tensor], scale: float, dropout_p: float) -> torch.Tensor:
    """``result + scale · B A dropout(x) + scale · lora_bias`` in one op (a new tensor).

    It runs in the adapter's dtype (autocast's under autocast) promoted with ``result``'s, the
    dtype that adding the composed ops' low-rank output to ``result`` would give."""
    cast = cast_all(torch.promote_types(result.dtype, compute_dtype(A)), x, result, A, B, lora_bias)
    if dropout_p == 0 and not torch.is_grad_enabled():
        # inference (generation, serving): the forward's own ops, without autograd's bookkeeping,
        # which costs more than the rank-r matmuls of a decoding step's few rows
        x, result, A, B, lora_bias = cast
        out = torch.addmm(result.reshape(-1, result.shape[-1]), x.reshape(-1, x.shape[-1]) @ A.T, B.T,
                          alpha=float(scale))
        if lora_bias is not None:
            out.add_(lora_bias, alpha=float(scale))
        return out.view(result.shape)
    with torch.autocast(x.device.type, enabled=False):
        return _LoraAdd.apply(*cast, float(scale), float(dropout_p))
