"""Triton kernels for 4-bit (NF4/FP4) weights: dequantization, and matmuls that decode in the tile.

The packed layout is ``quant.blockwise``'s (bitsandbytes'): the (out, in) weight flattened, two
4-bit indices a byte with the first value in the high nibble, one float32 absmax per
``blocksize`` values, or with double quantization one uint8 index into a 256-value code per
block, scaled per 256 blocks and shifted by a mean. A kernel reads the bytes and the (nested)
scales and forms each value as ``code[index] * absmax`` in float32, cast to the compute dtype
(the reference's arithmetic), inside the tile that uses it:

- ``dequantize``: the whole weight, for the cases that need it (merging, a norm).
- ``matmul_t``: ``x @ Wᵀ`` (a layer's forward); ``matmul``: ``g @ W`` (the input's gradient).
  Neither writes a full-precision copy of ``W`` to memory.

The PyTorch reference in ``quant.blockwise`` is the ground truth: the tests hold ``dequantize``
to it bit for bit and the matmuls to a matmul of the reference weight. On a machine without a
GPU the same kernels run under ``TRITON_INTERPRET=1`` (small shapes, in the tests).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..quant.blockwise import QuantState

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """float32 ``x`` in ``dtype``, rounded to nearest even. bfloat16 is rounded by hand on the bits:
    Triton's interpreter truncates that conversion, and the kernels must round alike everywhere."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _scales(blk, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, mask, NESTED: tl.constexpr):
    """float32 absmax of the blocks ``blk`` (decoding the nested 8-bit scales when ``NESTED``)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        value = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        outer = tl.load(nested_absmax_ptr + blk // 256, mask=mask, other=0.0)
        return value * outer + tl.load(offset_ptr)
    return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _decode(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, flat, mask,
            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """float32 values of the weight at flat positions ``flat`` (any shape)."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = _scales(flat // BLOCKSIZE, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, mask, NESTED)
    return value * scale


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
                       numel, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr):
    # Both values of a byte lie in one block (block sizes are even): one scale per byte.
    byte_index = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    in_bounds = byte_index * 2 < numel
    byte = tl.load(packed_ptr + byte_index, mask=in_bounds, other=0).to(tl.int32)
    scale = _scales(byte_index * 2 // BLOCKSIZE, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                    in_bounds, NESTED)
    high = tl.load(code_ptr + (byte >> 4), mask=in_bounds, other=0.0) * scale
    low = tl.load(code_ptr + (byte & 15), mask=in_bounds, other=0.0) * scale
    values = tl.reshape(tl.join(high, low), (2 * BYTES,))
    position = tl.program_id(0) * 2 * BYTES + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + position, _cast(values, out_ptr.dtype.element_ty),
             mask=position < numel)


@triton.jit
def _matmul_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
                   M, N, K, stride_xm, stride_xk, stride_om, stride_on, W_COLS,
                   TRANSPOSED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out (M, N) = x (M, K) @ V`` where ``V`` is ``Wᵀ`` (``TRANSPOSED``: W is (N, K)) or ``W``
    (W is (K, N)); ``W_COLS`` is the stored weight's row length."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        mask = (ks[:, None] < K) & (cols[None, :] < N)
        if TRANSPOSED:  # V[k, n] = W[n, k]
            flat = cols[None, :].to(tl.int64) * W_COLS + ks[:, None]
        else:  # V[k, n] = W[k, n]
            flat = ks[:, None].to(tl.int64) * W_COLS + cols[None, :]
        v = _decode(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, flat, mask,
                    BLOCKSIZE, NESTED)
        v = _cast(v, x.dtype)
        if UPCAST:  # the interpreter multiplies 16-bit floats as integers: the same products in float32
            acc = tl.dot(x.to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(x, v, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             _cast(acc, out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def _state_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """The kernels' scale and code arguments for ``state`` (unused ones point at the absmax)."""
    nested = state.nested
    if nested is None:
        return (packed.reshape(-1), state.absmax, state.absmax, state.absmax, state.absmax, state.code), False
    return (packed.reshape(-1), state.absmax, nested.absmax, nested.code, nested.offset.reshape(1),
            state.code), True


def dequantize(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``quant.blockwise.dequantize_4bit`` as one kernel; the same values, bit for bit."""
    dtype = dtype or state.dtype
    numel = state.shape.numel()
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    args, nested = _state_args(packed, state)
    nbytes = 1024
    grid = (triton.cdiv(numel, 2 * nbytes),)
    # No fused multiply-add: code * absmax (+ offset) must round as the reference's separate ops do.
    extra = {} if INTERPRETING else {"enable_fp_fusion": False}
    _dequantize_kernel[grid](*args, out, numel, BLOCKSIZE=state.blocksize, NESTED=nested, BYTES=nbytes, **extra)
    return out.view(state.shape)


def _tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps): tiles for the row count (decode-in-tile favours wide N)."""
    if INTERPRETING:
        return 16, 32, 32, 4
    if m <= 16:
        return 16, 128, 64, 4
    if m <= 64:
        return 64, 128, 64, 4
    return 128, 128, 64, 8


def _matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState, transposed: bool) -> torch.Tensor:
    out_features, in_features = state.shape
    n, k = (out_features, in_features) if transposed else (in_features, out_features)
    if x.shape[-1] != k:
        raise ValueError(f"4-bit matmul: input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args, nested = _state_args(packed, state)
    block_m, block_n, block_k, warps = _tiles(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    # float32 inputs multiply in full float32, as torch's matmul does unless TF32 is allowed
    precision = ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee") if x.dtype == torch.float32 else None
    extra = {} if INTERPRETING else {"num_warps": warps, "num_stages": 3}
    upcast = INTERPRETING and x.dtype != torch.float32
    _matmul_kernel[grid](x2, *args, out, m, n, k, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
                         in_features, TRANSPOSED=transposed, BLOCKSIZE=state.blocksize, NESTED=nested,
                         PRECISION=precision, UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         **extra)
    return out.view(*x.shape[:-1], n)


def matmul_t(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``x @ Wᵀ`` for a 4-bit (out, in) weight ``W``; ``x`` is (..., in)."""
    return _matmul(x, packed, state, transposed=True)


def matmul(g: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``g @ W`` for a 4-bit (out, in) weight ``W``; ``g`` is (..., out) (a gradient of ``x @ Wᵀ``)."""
    return _matmul(g, packed, state, transposed=False)
