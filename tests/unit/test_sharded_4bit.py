"""Quantizing into FSDP2 shards from row slices (``distributed.sharded_4bit``), without processes:
each rank's share, put side by side, is exactly what quantizing the whole weight gives, also where
the shards' edges fall inside a block and the last block is short."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.distributed.sharded_4bit import _quantize_share, rows_of, dequantized_rows, meta_linear4bit
from deltatune.quant.blockwise import quantize_4bit
from deltatune.quant.convert import QuantizeConfig
from deltatune.quant.layers import Linear4bit


def _reader(weight: torch.Tensor, reads: list):
    def read(key: str, start: int, stop: int) -> torch.Tensor:
        reads.append(stop - start)
        return weight[start:stop]
    return read


@pytest.mark.parametrize("shape,blocksize", [((16, 32), 64), ((5, 50), 64), ((7, 96), 32), ((48, 64), 128)])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_the_shares_of_all_ranks_are_the_whole_weights_bytes_and_scales(shape, blocksize, world, quant_type,
                                                                          double_quant):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant=False)  # exact float32 scales
    config = QuantizeConfig(quant_type, blocksize, double_quant)
    layer = meta_linear4bit(nn.Linear(shape[1], shape[0], bias=False, device="meta"), config, weight.dtype)
    blocks = state.absmax.numel()
    pieces, scales, reads = [], [], []
    for rank in range(world):
        share = _quantize_share(layer, _reader(weight, reads), "w", rank, world)
        pieces.append(share.packed)
        if double_quant:  # a rank holds the codes of its rows of blocks: it contributes their scales
            start, stop = rows_of(blocks, rank, world)
            scales.append(share.scales[start - share.first_block: stop - share.first_block])
        else:  # a rank holds its rows of the float32 scales' bytes, which may cut a scale in two
            start, stop = rows_of(4 * blocks, rank, world)
            as_bytes = share.scales.contiguous().view(torch.uint8)
            scales.append(as_bytes[start - 4 * share.first_block: stop - 4 * share.first_block])
    assert torch.equal(torch.cat(pieces), packed)
    whole_scales = state.absmax if double_quant else state.absmax.view(torch.uint8)
    assert torch.equal(torch.cat(scales), whole_scales)
    if world > 1:  # no rank read the whole weight (a row of overlap at most at each edge)
        assert max(reads) <= -(-shape[0] // world) + 2, reads


@pytest.mark.parametrize("shape,blocksize", [((16, 32), 64), ((5, 50), 64), ((12, 96), 32)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_rows_are_the_rows_of_the_whole_dequantized_weight(shape, blocksize, double_quant):
    torch.manual_seed(1)
    weight = torch.randn(shape)
    packed, state = quantize_4bit(weight, "nf4", blocksize, double_quant)
    whole = Linear4bit(packed, state).dequantize(torch.float32)
    layer = Linear4bit(packed, state)
    decoded = state.block_scales() if double_quant else None
    for start, stop in ((0, 1), (1, 3), (shape[0] - 2, shape[0]), (0, shape[0])):
        rows = dequantized_rows(layer, _reader(weight, []), "w", start, stop, decoded)
        assert torch.equal(rows, whole[start:stop]), (start, stop)


def test_a_meta_4bit_layer_has_the_shapes_of_a_quantized_one():
    weight = torch.randn(24, 40)
    for double_quant in (True, False):
        packed, state = quantize_4bit(weight, "nf4", 64, double_quant)
        config = QuantizeConfig("nf4", 64, double_quant)
        layer = meta_linear4bit(nn.Linear(40, 24, device="meta"), config, torch.bfloat16)
        assert layer.weight.is_meta and layer.weight.shape == packed.shape and layer.weight.dtype == torch.uint8
        assert layer.quant_state.absmax.shape == state.absmax.shape
        assert layer.quant_state.absmax.dtype == state.absmax.dtype
        assert layer.quant_state.dtype == torch.bfloat16 and layer.bias is not None and layer.bias.is_meta
        assert layer.dequantize().shape == (24, 40)  # a meta stand-in (DoRA's add reads its shape)
        if double_quant:
            assert layer.quant_state.nested.absmax.shape == state.nested.absmax.shape
