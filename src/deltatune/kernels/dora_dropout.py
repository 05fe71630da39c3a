"""DoRA with dropout as one autograd op, without a second dense base matmul.

With dropout, DoRA's output is ``y = result + (f − 1)·W d(x) + f·s·B A d(x)`` where
``result = W x + b`` is the base layer's output, ``d(x) = keep·x_z`` the dropped-out input
(``x_z``: ``x`` with the dropped elements zeroed, ``keep = 1/(1−p)``) and ``f = m / ||W + s·BA||``.
The composed ops (the reference, HF PEFT) run ``W`` over ``d(x)``: a second full base matmul
forward and another one backward. This op uses ``W x_z = (result − b) − W x_o``, where ``x_o``
holds only the dropped elements of ``x`` (about p of them), so the second matmul becomes a sparse
× dense product over those elements; in backward the input gradient through that term is folded
into the gradient of ``result`` (which the base layer turns into one matmul with ``W``), plus a
correction sampled only at the dropped positions.

Above ``SPARSE_LIMIT`` (a dense mask) the dropped elements are no longer few, and on a GPU (or
in half precision) sparse ops do not pay; there the op runs the second matmul densely over the
zeroed input, still keeping less for backward than the composed ops.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .dtypes import cast_all, compute_dtype
from .lora_fused import _Dropout


def _dropped_csr(x2: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``x2``'s elements at the sorted flat positions ``flat`` as a CSR matrix of ``x2``'s shape."""
    rows, width = x2.shape
    counts = torch.bincount(flat // width, minlength=rows)
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=x2.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():  # PyTorch marks CSR tensors beta; the ops used here are plain
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, flat % width, x2.reshape(-1)[flat], x2.shape)


def _sampled(csr_pattern: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``(left @ right)`` at the positions of ``csr_pattern`` only, as a flat vector."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse.sampled_addmm(csr_pattern, left, right, beta=0.0).values()


def _sparse_path(x2: torch.Tensor, drop: _Dropout) -> bool:
    """Whether the dropped elements are few and PyTorch's sparse CPU ops serve this dtype. On
    a GPU the second matmul runs densely over the zeroed input: its matmuls are cheap there,
    and the op still keeps less for backward than the composed ops."""
    return drop.flat is not None and x2.device.type == "cpu" and x2.dtype in (torch.float32, torch.float64)


class _DoraDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, result, bias, weight, A, B, magnitude, norm, scale: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])
        r2 = result.reshape(-1, result.shape[-1])
        drop = _Dropout.draw(x2, p)
        sparse = _sparse_path(x2, drop)
        if sparse:  # W x_z = (result − b) − W x_o, with x_o sparse
            u = torch.sparse.mm(_dropped_csr(x2, drop.flat), weight.T) if drop.flat.numel() else torch.zeros_like(r2)
            u = torch.sub(r2, u) if bias is None else (r2 - bias).sub_(u)
        else:
            u = drop.zeroed(x2, copy=True) @ weight.T
        h = drop.low_rank_input(x2, A)  # x_z Aᵀ
        factor = magnitude / norm
        out = torch.addmm(r2, h, (B * (factor * (scale * drop.keep))[:, None]).T)
        out.addcmul_(u, (factor - 1) * drop.keep)
        ctx.scale, ctx.p, ctx.sparse = scale, p, sparse
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, weight, A, B, h, u, magnitude, norm, *drop.tensors())
        ctx.x_shape = x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, A, B, h, u, magnitude, norm, flat, mask = ctx.saved_tensors
        drop = _Dropout(ctx.p, flat, mask)
        scale, keep = ctx.scale, drop.keep
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        factor = magnitude / norm
        g_minus = g2 * (factor - 1)  # d loss / d (W x_z), over keep
        gh = ((g2 * factor) @ B).mul_(scale)  # d loss / d (x_z Aᵀ), over keep
        grad_x = grad_result = grad_bias = grad_A = grad_B = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = drop.add_grad_x(None, gh, A)
            if not ctx.sparse:  # the dense second matmul's input gradient
                grad_x.add_(drop.zeroed(g_minus @ weight, copy=False), alpha=keep)
            elif flat.numel():  # W x_o's gradient, at the dropped positions only
                grad_x.view(-1).index_add_(0, flat, _sampled(_dropped_csr(x2, flat), g_minus, weight), alpha=-keep)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # through (result − b), from which the dropped part was subtracted
            grad_result = (g2 + g_minus * keep if ctx.sparse else g2).view(grad_out.shape)
        if ctx.has_bias and ctx.needs_input_grad[2] and ctx.sparse:
            grad_bias = g_minus.sum(0).mul_(-keep)
        if ctx.needs_input_grad[4]:
            grad_A = drop.grad_A(gh, x2)
        gTh = g2.T @ h  # (out, r)
        if ctx.needs_input_grad[5]:
            grad_B = (gTh * factor[:, None]).mul_(scale * keep)
        if ctx.needs_input_grad[6]:  # d loss / d f = keep·(Σ g ⊙ u + s·Σ g ⊙ h Bᵀ), and f = m / norm
            grad_m = ((g2 * u).sum(0) + scale * (gTh * B).sum(1)).mul_(keep / norm)
        return grad_x, grad_result, grad_bias, None, grad_A, grad_B, grad_m, None, None, None


def dora_dropout_add(x: torch.Tensor, result: torch.Tensor, bias: Optional[torch.Tensor], weight: torch.Tensor,
                     A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scale: float,
                     dropout_p: float) -> torch.Tensor:
    """``result + (f − 1)·W d(x) + f·scale·B A d(x)``, ``f = magnitude / norm`` (``norm`` a
    constant) and ``d`` dropout with probability ``dropout_p``, in one op. ``result`` is the
    base layer's output ``x Wᵀ + bias``; ``weight`` is its (out, in) weight, frozen.

    It runs in the adapter's dtype (autocast's under autocast) promoted with ``result``'s.
    """
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dora_dropout_add is DoRA with dropout; dropout_p must be in (0, 1), got {dropout_p}")
    if weight.requires_grad:
        raise ValueError("dora_dropout_add needs a frozen base weight (it gives the weight no gradient)")
    dtype = torch.promote_types(result.dtype, compute_dtype(A))
    cast = cast_all(dtype, x, result, bias, weight, A, B, magnitude, norm.detach())
    with torch.autocast(x.device.type, enabled=False):
        return _DoraDropout.apply(*cast, float(scale), float(dropout_p))
