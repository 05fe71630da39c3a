"""DoRA's output as one autograd op: ``y = f ⊙ (result − b + s·B A x) + b`` with ``f = m / ||W + s·BA||``.

The composed form (``result + (f − 1)·(result − b) + f·s·B A x``, the reference and HF PEFT's)
keeps the base output, the low-rank output and their scaled copies for backward. This op
writes one output tensor and keeps, besides the input and the rank-r product, only that
output: the magnitude's gradient needs ``result − b + s·B A x``, which is ``(y − b) / f``, so
it reads ``y`` (which the next layer usually keeps anyway). Where a magnitude entry is zero
that division is impossible, and the op keeps the undivided sum instead.

Used without dropout (evaluation, or ``lora_dropout = 0``); with dropout DoRA's base term reads
the dropped-out input, which needs a second base matmul, and the layer uses the composed ops.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dtypes import cast_all, compute_dtype


class _DoraAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, result, bias, A, B, magnitude, norm, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        r2 = result.reshape(-1, result.shape[-1])
        base = r2 - bias if bias is not None else r2
        h = x2 @ A.T
        out = torch.addmm(base, h, B.T, alpha=scale)  # result - b + s·B A x, a new tensor
        factor = magnitude / norm
        divisible = bool((magnitude != 0).all())
        undivided = None if divisible else out.clone()
        out.mul_(factor)
        if bias is not None:
            out.add_(bias)
        ctx.scale, ctx.divisible, ctx.has_bias = scale, divisible, bias is not None
        ctx.save_for_backward(x2, A, B, h, magnitude, norm, out if divisible else undivided, bias)
        ctx.x_shape = x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2, A, B, h, magnitude, norm, kept, bias = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        factor = magnitude / norm
        grad_m = None
        if ctx.needs_input_grad[5]:
            if ctx.divisible:  # kept is the output y; (y - b) / f is the undivided sum
                column = (g2 * kept).sum(0)
                if bias is not None:
                    column -= bias * g2.sum(0)
                grad_m = column / magnitude
            else:
                grad_m = (g2 * kept).sum(0) / norm
        g_f = g2 * factor  # d loss / d (result - b + s·B A x)
        gh = (g_f @ B).mul_(ctx.scale)
        grad_x = (gh @ A).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_result = g_f.view(grad_out.shape) if ctx.needs_input_grad[1] else None
        grad_bias = g2.sum(0) * (1 - factor) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_A = gh.T @ x2 if ctx.needs_input_grad[3] else None
        grad_B = (g_f.T @ h).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        return grad_x, grad_result, grad_bias, grad_A, grad_B, grad_m, None, None


def dora_add(x: torch.Tensor, result: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
             B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scale: float) -> torch.Tensor:
    """``result + (f − 1)·(result − bias) + f·scale·B A x`` with ``f = magnitude / norm`` (``norm``
    treated as a constant), in one op. ``result`` is the base layer's output including ``bias``.

    It runs in the adapter's dtype (autocast's under autocast) promoted with ``result``'s.
    """
    dtype = torch.promote_types(result.dtype, compute_dtype(A))
    cast = cast_all(dtype, x, result, bias, A, B, magnitude, norm.detach())
    with torch.autocast(x.device.type, enabled=False):
        return _DoraAdd.apply(*cast, float(scale))
