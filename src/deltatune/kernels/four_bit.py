"""The ops a 4-bit layer calls: ``dequantize`` and ``matmul``. This module picks how they run.

- On a CUDA device with Triton: ``kernels.nf4_triton``. The matmul decodes the weight inside
  its tiles when there are few rows (no full-precision weight is written); with many rows
  each block of rows would decode the whole weight again, so it decodes once into a
  temporary and calls cuBLAS.
- Elsewhere: the PyTorch reference (``quant.blockwise.dequantize_4bit``), writing the weight a
  matmul needs into reused CPU buffers (``quant.scratch``).

Either way the matmul is one autograd op that keeps only the packed weight for backward and
forms the weight again there, so training memory stays near the quantized size.
``DELTATUNE_4BIT_KERNELS`` forces a path: ``torch`` (the reference), ``fused`` or
``dequantize`` (the two GPU paths), to compare them or to measure their crossover.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..quant.blockwise import QuantState, dequantize_4bit

# Rows up to which decoding inside the tiles wins. From the kernel's design, not yet from a
# GPU measurement: decoding a tile costs about as much as 128 rows of its multiply-adds.
FUSED_MAX_ROWS = 128


def triton_kernels():
    """``kernels.nf4_triton`` where it runs compiled (Triton installed, not its interpreter), else
    None (also when ``DELTATUNE_4BIT_KERNELS=torch``)."""
    if os.environ.get("DELTATUNE_4BIT_KERNELS") == "torch":
        return None
    try:
        from . import nf4_triton
    except ImportError:  # Triton is not installed
        return None
    return None if nf4_triton.INTERPRETING else nf4_triton


def fused_path(rows: int) -> bool:
    """Whether a GPU matmul over ``rows`` rows decodes inside its tiles."""
    choice = os.environ.get("DELTATUNE_4BIT_KERNELS", "")
    return choice == "fused" or (choice != "dequantize" and rows <= FUSED_MAX_ROWS)


def _gpu(packed: torch.Tensor):
    return triton_kernels() if packed.is_cuda else None


def dequantize(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight ``packed`` stands for, as a new tensor; the same values on every path."""
    gpu = _gpu(packed)
    if gpu is not None:
        return gpu.dequantize(packed, state, dtype)
    return dequantize_4bit(packed, state, dtype)


def _product(x: torch.Tensor, packed: torch.Tensor, state: QuantState, transposed: bool) -> torch.Tensor:
    """``x @ Wᵀ`` (``transposed``, the forward pass) or ``x @ W`` (the input's gradient)."""
    gpu = _gpu(packed)
    if gpu is None:
        weight = dequantize_4bit(packed, state, x.dtype, reuse=True)
        return x @ (weight.T if transposed else weight)
    if fused_path(x.numel() // max(1, x.shape[-1])):
        return (gpu.matmul_t if transposed else gpu.matmul)(x, packed, state)  # any strides
    weight = gpu.dequantize(packed, state, x.dtype)
    return x @ (weight.T if transposed else weight)


class _Matmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
        ctx.packed, ctx.state = packed, state  # frozen: kept by reference, not saved as activations
        return _product(x, packed, state, transposed=True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = _product(grad_out, ctx.packed, ctx.state, transposed=False) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``x @ Wᵀ`` for the 4-bit (out, in) weight ``W`` of ``(packed, state)``, differentiable in ``x``."""
    return _Matmul4bit.apply(x, packed, state)
