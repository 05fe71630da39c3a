"""Blockwise 4-bit (NF4/FP4) and 8-bit quantization with double-quantized scales.

Plain PyTorch, any device. The layout is bitsandbytes': a flattened weight is cut into
blocks of ``blocksize`` values, each block is divided by its absolute maximum and every
value becomes the index of the nearest code value; two 4-bit indices share a byte, the
first in the high nibble, and the bytes form a ``(n/2, 1)`` uint8 tensor. With double
quantization the float32 absmax values lose their mean and are themselves quantized to
8 bits in blocks of 256 with the dynamic code (QLoRA, §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .codes import code_4bit, dynamic_map
from .scratch import scratch

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_LUT_BINS = 65536


@dataclass
class NestedState:
    """The 8-bit quantized absmax of a 4-bit tensor: ``absmax4 = code[q] * absmax + offset``."""

    absmax: torch.Tensor  # float32, one per block of NESTED_BLOCKSIZE scales
    code: torch.Tensor  # the 256-value dynamic code
    blocksize: int
    offset: torch.Tensor  # float32 scalar: the mean that was subtracted


@dataclass
class QuantState:
    """Everything needed to turn packed 4-bit bytes back into a tensor."""

    absmax: torch.Tensor  # float32 per block, or uint8 indices when ``nested`` is set
    shape: torch.Size
    dtype: torch.dtype  # dtype of the tensor that was quantized (and that dequantize returns)
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested: Optional[NestedState] = None

    def to(self, device: torch.device | str) -> "QuantState":
        nested = self.nested
        if nested is not None:
            nested = NestedState(nested.absmax.to(device), nested.code.to(device), nested.blocksize,
                                 nested.offset.to(device))
        return QuantState(self.absmax.to(device), self.shape, self.dtype, self.blocksize, self.quant_type,
                          self.code.to(device), nested)

    def block_scales(self) -> torch.Tensor:
        """The float32 absmax of every block (dequantizing the nested scales if needed)."""
        if self.nested is None:
            return self.absmax.float()
        n = self.nested
        return dequantize_blockwise_8bit(self.absmax, n.absmax, n.code, n.blocksize).add_(n.offset)

    def value_pairs(self) -> torch.Tensor:
        """(256, 2) float32: the two code values each byte stands for, high nibble first.

        Derived from ``code`` once per state (and device) and kept, so dequantizing in every
        forward pass neither rebuilds it nor compares tables.
        """
        pairs = self.__dict__.get("_value_pairs")
        if pairs is None or pairs.device != self.code.device:
            code = self.code.float()
            pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
            self.__dict__["_value_pairs"] = pairs
        return pairs

    def storage_bytes(self) -> int:
        """Bytes of the scale tensors (the packed weight itself not included)."""
        total = self.absmax.numel() * self.absmax.element_size()
        if self.nested is not None:
            total += self.nested.absmax.numel() * 4 + 4  # nested scales + the offset
        return total


def _scale_blocks_(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply flat ``values`` in place by the scale of their block of ``blocksize`` (the last
    block may be partial); returns ``values``."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize].unsqueeze(1))
    if full < n:
        values[full:].mul_(scales[full // blocksize])
    return values


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, values divided by their block's absmax and clamped to [-1, 1])."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        # The tail block divides rather than multiplying by the reciprocal, as bitsandbytes
        # does; the two can differ in the last bit, which can flip a rounding.
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    return absmax, scaled


# Blocks quantized per step: bounds the temporaries (about 30 bytes per value) to a few MB,
# so quantizing a model layer by layer does not grow the process heap with every layer.
_CHUNK_BLOCKS = 4096


def _indices_4bit(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value for each scaled value; a midpoint goes to the lower one."""
    order = torch.argsort(code, stable=True)  # FP4's index order is not value order: map back
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    bucket = torch.bucketize(scaled, midpoints, out_int32=True)
    return order.to(torch.uint8)[bucket.long()] if not torch.equal(order, torch.arange(16, device=order.device)) \
        else bucket.to(torch.uint8)


def quantize_4bit(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Pack ``weight`` into 4-bit indices; returns ``(packed (ceil(n/2), 1) uint8, state)``."""
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization takes float32/float16/bfloat16 weights, got {weight.dtype}")
    code = code_4bit(quant_type, weight.device)
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    chunk = blocksize * _CHUNK_BLOCKS
    index = torch.empty(n + n % 2, dtype=torch.uint8, device=weight.device)
    index[n:] = 7 if quant_type == "nf4" else 0  # the pad value of an odd count: code value 0
    absmax_parts = []
    for start in range(0, full, chunk):
        stop = min(start + chunk, full)
        absmax, scaled = _scaled_blocks(flat[start:stop].float(), blocksize)
        absmax_parts.append(absmax)
        index[start:stop] = _indices_4bit(scaled, code)
    if full < n:
        absmax, scaled = _scaled_blocks(flat[full:].float(), blocksize)
        absmax_parts.append(absmax)
        index[full:n] = _indices_4bit(scaled, code)
    absmax = torch.cat(absmax_parts) if absmax_parts else torch.zeros(0, device=weight.device)
    packed = ((index[0::2] << 4) | index[1::2]).unsqueeze(1)
    nested = None
    if double_quant:
        offset = absmax.mean()
        q_absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        nested = NestedState(nested_absmax, dynamic_map().to(weight.device), NESTED_BLOCKSIZE, offset)
        absmax = q_absmax
    return packed, QuantState(absmax, weight.shape, weight.dtype, blocksize, quant_type, code, nested)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None,
                    reuse: bool = False) -> torch.Tensor:
    """The tensor ``packed`` stands for, in ``dtype`` (default: the dtype that was quantized).

    Each value is ``code[index] * absmax`` in float32, then cast: bitsandbytes' arithmetic, so
    the results are identical. With ``reuse`` (CPU) the result lives in a per-thread buffer
    that the next reusing call overwrites: for a caller that consumes the weight at once, as
    a quantized layer's matmul does, it saves a fresh allocation of the whole weight per pass.
    """
    dtype = dtype or state.dtype
    numel = state.shape.numel()
    nbytes = packed.numel()
    reuse = reuse and packed.device.type == "cpu"
    # One lookup per byte gives both of its values; int32 indices keep the temporaries small.
    index = packed.reshape(-1)
    if reuse:
        index = scratch("dequantize.index", nbytes, torch.int32, packed.device).copy_(index)
    else:
        index = index.int()
    # Each pair of float32 values moves as one int64: a 1-D gather is several times faster than
    # copying 8-byte rows of a 2-D table.
    pairs = state.value_pairs().view(torch.int64).view(-1)
    if reuse:
        values = scratch("dequantize.values", 2 * nbytes, torch.float32, packed.device)
        torch.index_select(pairs, 0, index, out=values.view(torch.int64))
    else:
        values = torch.index_select(pairs, 0, index).view(torch.float32)
    values = _scale_blocks_(values[:numel], state.block_scales(), state.blocksize)
    if dtype == torch.float32:
        return values.view(state.shape)
    if reuse:
        return scratch("dequantize.out", numel, dtype, packed.device).copy_(values).view(state.shape)
    return values.view(state.shape).to(dtype)


def _nearest_index_table(code: torch.Tensor) -> torch.Tensor:
    """For each of 65,536 evenly spaced points in [-1, 1], the index of the nearest code value.

    bitsandbytes quantizes 8-bit blocks on the CPU through this table (a value is rounded to
    the nearest grid point first); using the same table makes the bytes identical. It differs
    from exact nearest-value rounding only within 1/65535 of a midpoint between code values.
    """
    grid = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32, device=code.device)) / (_LUT_BINS - 1)
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.bucketize(grid, midpoints).to(torch.uint8)


_TABLES: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _table_for(code: torch.Tensor) -> torch.Tensor:
    key = (str(code.device), code.data_ptr())
    cached = _TABLES.get(key)
    if cached is None or not torch.equal(cached[0], code):
        cached = (code.clone(), _nearest_index_table(code))
        _TABLES[key] = cached
    return cached[1]


def quantize_blockwise_8bit(
    values: torch.Tensor, blocksize: int = 256, code: Optional[torch.Tensor] = None, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a 256-value code (default: signed dynamic).

    Returns ``(indices uint8 shaped like values, float32 absmax per block)``. By default a
    value is rounded through bitsandbytes' 65,536-point table (identical bytes); ``exact``
    rounds to the truly nearest code value, which optimizer states need: their small
    values lie far below the table's resolution.
    """
    if code is None:
        code = dynamic_map().to(values.device)
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = (padded * inverse.unsqueeze(1)).clamp(-1, 1)
    if exact:
        index = torch.bucketize(normed, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    else:
        bins = ((normed + 1.0) * 0.5 * (_LUT_BINS - 1) + 0.5).to(torch.int64)
        index = _table_for(code)[bins]
    index = torch.where((absmax > 0).unsqueeze(1), index, torch.zeros_like(index))
    return index.reshape(-1)[:n].view(values.shape), absmax


def dequantize_blockwise_8bit(
    index: torch.Tensor, absmax: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 256
) -> torch.Tensor:
    """float32 values of 8-bit blockwise ``index`` (the inverse of ``quantize_blockwise_8bit``)."""
    if code is None:
        code = dynamic_map().to(index.device)
    # A 1-D int32 gather and an in-place scale: this decodes every 4-bit layer's nested scales in
    # every pass, and the 8-bit optimizer's states in every step.
    flat = torch.index_select(code, 0, index.reshape(-1).int())
    return _scale_blocks_(flat, absmax.reshape(-1), blocksize).view(index.shape)
