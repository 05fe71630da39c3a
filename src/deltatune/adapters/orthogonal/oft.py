"""OFT layers: the input is rotated block by block before the base layer.

Each adapter stores, per layer, the packed upper triangles of ``r`` skew-symmetric blocks
(``oft_R.weight``, shape (r, b(b-1)/2) with block size b = in/r; (1, ·) with ``block_share``),
PEFT's current (>= 0.14) layout. A block's rotation is the Cayley map of its skew matrix
(exact, or the Neumann series of ``use_cayley_neumann``); the layer computes
``base(x @ block_diag(R_1, …, R_r))``. Zero weights give the identity, so a new adapter
changes nothing. ``coft`` keeps every skew matrix within PEFT's norm bound, projecting the
stored values in place whenever the adapter is used, as PEFT does.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...config import OFTConfig
from ..method import LayerMethod, register_method
from .layer import InputMapLayer
from .maps import cayley, cayley_neumann, clip_skew_norm, dropped_blocks_mask, identity_blocks, rotate_blocks, \
    skew_from_upper


def nearest_divisor(width: int, wanted: int) -> int:
    """The divisor of ``width`` nearest ``wanted`` (the lower one on a tie; ``width`` when
    ``wanted`` exceeds it): PEFT's adjustment of a block size or count that does not divide."""
    if wanted >= width:
        return width
    higher = wanted
    while width % higher:
        higher += 1
    lower = wanted
    while lower > 1 and width % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def oft_blocks(in_features: int, r: int, block_size: int, key: str) -> tuple[int, int]:
    """(number of blocks, block size) for a layer ``in_features`` wide; sizes that do not divide
    are moved to the nearest divisor with a warning, as PEFT moves them (so shapes agree)."""
    blocks, size = _blocks(in_features, r, block_size, key)
    if size < 2:  # a 1×1 skew matrix is 0: nothing to learn
        raise ValueError(f"OFT at {key!r}: r={blocks} blocks of a {in_features}-wide input leave blocks of size "
                         f"{size}, which have no parameters; use fewer blocks (smaller r or a larger oft_block_size)")
    return blocks, size


def _blocks(in_features: int, r: int, block_size: int, key: str) -> tuple[int, int]:
    if r == 0:
        if in_features % block_size:
            adjusted = nearest_divisor(in_features, block_size)
            warnings.warn(f"OFT: oft_block_size={block_size} does not divide the input width {in_features} of "
                          f"{key!r}; using {adjusted} there")
            block_size = adjusted
        return in_features // block_size, block_size
    if in_features % r:
        adjusted = nearest_divisor(in_features, r)
        warnings.warn(f"OFT: r={r} does not divide the input width {in_features} of {key!r}; using {adjusted} there")
        r = adjusted
    return r, in_features // r


class OFTLinear(InputMapLayer):
    """OFT around a linear-like layer."""

    adapter_dict_names = ("oft_R",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.oft_R = nn.ParameterDict()
        self.settings: dict[str, OFTConfig] = {}
        self.block_size: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.settings.pop(name, None)
        self.block_size.pop(name, None)

    def add(self, name: str, config: OFTConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, _ = self.in_out
        blocks, size = oft_blocks(in_features, config.r, config.oft_block_size, key)
        stored = 1 if config.block_share else blocks
        weight = torch.zeros(stored, size * (size - 1) // 2)
        if not from_file and not config.init_weights:
            nn.init.normal_(weight, mean=0.0, std=0.1)
        self.oft_R[name] = nn.Parameter(weight)
        self.settings[name] = config
        self.block_size[name] = size
        self.scaling[name] = 1.0
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": self.oft_R[name]}

    def rotations(self, name: str) -> torch.Tensor:
        """The stored blocks' rotations (stored blocks, b, b), in the adapter's dtype."""
        config, size, packed = self.settings[name], self.block_size[name], self.oft_R[name]
        if config.coft:
            with torch.no_grad():
                projected = clip_skew_norm(packed, size, config.eps)
                if not torch.equal(projected, packed):  # in place only when it changes (autograd versions)
                    packed.copy_(projected)
        skew = skew_from_upper(packed, size)
        if config.use_cayley_neumann:
            return cayley_neumann(skew, config.num_cayley_neumann_terms)
        return cayley(skew.float()).to(skew.dtype)

    def map_input(self, name: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        blocks = self.rotations(name)
        p = self.settings[name].module_dropout
        if training and p > 0 and blocks.shape[0] > 1:  # PEFT's rule: a shared block is never dropped
            blocks = identity_blocks(blocks, dropped_blocks_mask(blocks.shape[0], p, blocks.device))
        return rotate_blocks(x, blocks)


register_method("OFT", LayerMethod(OFTLinear, bias_only="oft_only"))
