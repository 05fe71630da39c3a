"""Quantizing a base to 4 bits straight into FSDP2 shards: no rank reads, quantizes or holds a
whole weight.

Under FSDP2 a 4-bit layer's packed bytes (``(n/2, 1)`` uint8) and block scales (uint8 codes with
double quantization, else float32 held as bytes) are parameters that ``fully_shard`` cuts into
rows (``Linear4bit.expose_to_sharding``). A rank's rows of the packed bytes are the values of one
contiguous range of the flattened weight, and its rows of the scales one range of blocks; each
rank reads the weight rows that cover its ranges from safetensors, quantizes those whole blocks,
and keeps its part. Double quantization needs every block's scale (their mean is subtracted and
they are quantized in groups of 256): each rank computes the scales of its own blocks and one
all-gather gives every rank all of them, which it then treats exactly as ``quantize_4bit`` does,
so the bytes equal a one-process quantization's. A checkpoint saved in 4 bits needs no
quantizing: each rank reads its rows of the packed bytes and scales as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as torch_dist
from torch import nn

from ..quant.blockwise import (
    NESTED_BLOCKSIZE, NestedState, QuantState, dequantize_4bit, quantize_4bit, quantize_blockwise_8bit,
)
from ..quant.codes import code_4bit, dynamic_map
from ..quant.convert import QuantizeConfig
from ..quant.layers import Linear4bit

# Reads rows ``start:stop`` of the checkpoint tensor ``key``.
RowReader = Callable[[str, int, int], torch.Tensor]


def meta_linear4bit(linear: nn.Linear, config: QuantizeConfig, stored_dtype: torch.dtype) -> Linear4bit:
    """A ``Linear4bit`` on the meta device with ``linear``'s shape and ``config``'s settings: the
    shapes FSDP2 shards, no storage. ``stored_dtype`` is the checkpoint's dtype of the weight (what
    a one-process load records as the quantized tensor's dtype)."""
    out_features, in_features = linear.weight.shape
    n = out_features * in_features
    blocks = -(-n // config.blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device="meta")
    nested = None
    if config.double_quant:
        # stand-ins with storage: moved with the model when it gets storage, replaced once filled
        nested = NestedState(torch.zeros(-(-blocks // NESTED_BLOCKSIZE)), dynamic_map(), NESTED_BLOCKSIZE,
                             torch.zeros(()))
    scales = torch.empty(blocks, dtype=torch.uint8 if config.double_quant else torch.float32, device="meta")
    state = QuantState(scales, torch.Size((out_features, in_features)), stored_dtype, config.blocksize,
                       config.quant_type, code_4bit(config.quant_type), nested)
    return Linear4bit(packed, state, linear.bias, config.compute_dtype)


def rows_of(length: int, rank: int, world: int) -> tuple[int, int]:
    """FSDP2's rows of a dimension of ``length`` for ``rank``: ``torch.chunk``'s split, ceil(length / world)
    each, the last short."""
    chunk = -(-length // world)
    start = min(rank * chunk, length)
    return start, min(start + chunk, length)


def _elements(read: RowReader, key: str, columns: int, start: int, stop: int) -> torch.Tensor:
    """Flat values ``start:stop`` of the (out, in) weight ``key``, read as the rows that hold them."""
    first, last = start // columns, -(-stop // columns)
    rows = read(key, first, last).reshape(-1)
    return rows[start - first * columns: stop - first * columns]


@dataclasses.dataclass
class _Piece:
    """One rank's share of a layer: the packed bytes of its rows, and its blocks' float32 scales."""

    packed: torch.Tensor
    scales: torch.Tensor
    first_block: int


def _quantize_share(layer: Linear4bit, read: RowReader, key: str, rank: int, world: int) -> _Piece:
    """Quantize the whole blocks that cover this rank's packed bytes and its scales' rows."""
    state = layer.quant_state
    n, size = state.shape.numel(), state.blocksize
    blocks = -(-n // size)
    byte_start, byte_stop = rows_of((n + 1) // 2, rank, world)
    scale_start, scale_stop = _scale_blocks(blocks, state.nested is not None, rank, world)
    first = min(2 * byte_start // size, scale_start)
    last = max(-(-min(2 * byte_stop, n) // size), scale_stop)
    if last <= first:  # a rank with no rows of this layer
        return _Piece(torch.empty((0, 1), dtype=torch.uint8), torch.empty(0), first)
    values = _elements(read, key, state.shape[1], first * size, min(last * size, n))
    packed, piece = quantize_4bit(values, state.quant_type, size, double_quant=False)
    offset = (2 * byte_start - first * size) // 2  # first * size is even: a byte boundary
    return _Piece(packed[offset: offset + byte_stop - byte_start], piece.absmax, first)


def _scale_blocks(blocks: int, double_quant: bool, rank: int, world: int) -> tuple[int, int]:
    """The blocks whose scales this rank holds: its rows of uint8 codes, or of float32 bytes."""
    if double_quant:
        return rows_of(blocks, rank, world)
    start, stop = rows_of(4 * blocks, rank, world)
    return start // 4, -(-stop // 4)


def _gather_scales(piece: _Piece, blocks: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """Every block's float32 scale on every rank: each contributes those of its own rows."""
    start, stop = rows_of(blocks, rank, world)
    chunk = -(-blocks // world)
    mine = torch.zeros(chunk, device=device)
    mine[: stop - start] = piece.scales[start - piece.first_block: stop - piece.first_block].to(device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    torch_dist.all_gather(parts, mine)
    return torch.cat(parts)[:blocks]


def fill_4bit_layer(layer: Linear4bit, read: RowReader, key: str, rank: int, world: int,
                    compute_device: torch.device, want_scales: bool) -> Optional[torch.Tensor]:
    """Give ``layer`` (exposed to sharding and sharded by ``fully_shard``) its rank's packed bytes
    and scales, and its full quantization state on ``compute_device``. With ``want_scales`` and
    double quantization, returns every block's float32 scale as dequantizing decodes it (DoRA's
    starting norms need them; plain float32 scales are recomputed where needed), else None."""
    state = layer.quant_state
    blocks = -(-state.shape.numel() // state.blocksize)
    piece = _quantize_share(layer, read, key, rank, world)
    nested, decoded = None, None
    if state.nested is not None:  # one all-gather, then quantize_4bit's arithmetic on all the scales
        every = _gather_scales(piece, blocks, rank, world, _collective_device(compute_device))
        offset = every.mean()
        codes, nested_scales = quantize_blockwise_8bit(every - offset, NESTED_BLOCKSIZE)
        nested = NestedState(nested_scales, dynamic_map().to(codes.device), NESTED_BLOCKSIZE, offset)
        if want_scales:
            decoded = dataclasses.replace(state, absmax=codes, code=state.code.to(codes.device),
                                          nested=nested).block_scales()
        start, stop = rows_of(blocks, rank, world)
        scale_bytes = codes[start:stop]
    else:
        start, stop = rows_of(4 * blocks, rank, world)
        as_bytes = piece.scales.contiguous().view(torch.uint8)
        scale_bytes = as_bytes[start - 4 * piece.first_block: stop - 4 * piece.first_block]
    _place(layer, key, rank, piece.packed, scale_bytes, nested, compute_device)
    return decoded


def fill_saved_4bit_layer(layer: Linear4bit, read: RowReader, key: str, rank: int, world: int,
                          compute_device: torch.device, want_scales: bool) -> Optional[torch.Tensor]:
    """``fill_4bit_layer`` for a checkpoint saved already quantized (bitsandbytes' keys): the rank's
    rows of the packed bytes and of the scales are read as they are; the code and nested scales,
    small, came whole with the skeleton. With ``want_scales``, returns every block's float32 scale
    as dequantizing decodes it (DoRA's starting norms need them)."""
    state = layer.quant_state
    blocks = -(-state.shape.numel() // state.blocksize)
    packed = read(key, *rows_of((state.shape.numel() + 1) // 2, rank, world))
    if state.nested is not None:
        scale_bytes = read(key + ".absmax", *rows_of(blocks, rank, world))
    else:  # float32 scales, held as bytes: read the floats that hold this rank's bytes
        start, stop = rows_of(4 * blocks, rank, world)
        floats = read(key + ".absmax", start // 4, -(-stop // 4))
        scale_bytes = floats.contiguous().view(torch.uint8)[start % 4: start % 4 + stop - start]
    decoded = None
    if want_scales:
        every = read(key + ".absmax", 0, blocks)
        decoded = dataclasses.replace(state, absmax=every).block_scales() if state.nested is not None \
            else every.float()
    _place(layer, key, rank, packed, scale_bytes, state.nested, compute_device)
    return decoded


def _place(layer: Linear4bit, key: str, rank: int, packed: torch.Tensor, scale_bytes: torch.Tensor,
           nested: Optional[NestedState], compute_device: torch.device) -> None:
    """Copy a rank's packed bytes and scale bytes into its shards; the state, with ``nested``, goes
    to ``compute_device``."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for parameter, value in ((layer.weight, packed), (layer.absmax, scale_bytes)):
            local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
            if local.shape[0] != value.shape[0]:
                raise RuntimeError(f"{key}: rank {rank} holds {local.shape[0]} rows, was given {value.shape[0]}")
            local.copy_(value.reshape(local.shape))
    stand_in = torch.empty(0, dtype=layer._absmax_dtype)  # the scales live in the ``absmax`` parameter
    layer.quant_state = dataclasses.replace(layer.quant_state, absmax=stand_in, nested=nested).to(compute_device)


def _collective_device(compute_device: torch.device) -> torch.device:
    """Where a collective's tensors must live: the GPU under NCCL, else the CPU."""
    if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
        return compute_device
    return torch.device("cpu")


def dequantized_rows(layer: Linear4bit, read: RowReader, key: str, start: int, stop: int,
                     decoded: Optional[torch.Tensor], saved: bool = False) -> torch.Tensor:
    """Rows ``start:stop`` of ``layer.dequantize(torch.float32)``, from the checkpoint: the blocks
    that cover them quantized again (or, ``saved`` quantized, their packed bytes read), scaled by
    ``decoded`` (the fill functions' result) or, with plain float32 scales, by their own. DoRA's
    starting norms need these rows."""
    state = layer.quant_state
    size, columns, n = state.blocksize, state.shape[1], state.shape.numel()
    first, last = start * columns // size, -(-stop * columns // size)
    values_in_blocks = min(last * size, n) - first * size
    if saved:
        packed = read(key, first * size // 2, first * size // 2 + (values_in_blocks + 1) // 2)
        piece = QuantState(decoded[first:last], torch.Size([values_in_blocks]), torch.float32, size,
                           state.quant_type, state.code.to(packed.device))
    else:
        values = _elements(read, key, columns, first * size, first * size + values_in_blocks)
        packed, piece = quantize_4bit(values, state.quant_type, size, double_quant=False)
    scales = piece.absmax if decoded is None else decoded[first:last].to(piece.absmax.device)
    flat = dequantize_4bit(packed, dataclasses.replace(piece, absmax=scales), torch.float32)
    offset = start * columns - first * size
    return flat.reshape(-1)[offset: offset + (stop - start) * columns].view(stop - start, columns)
