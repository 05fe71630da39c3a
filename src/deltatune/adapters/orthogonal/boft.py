"""BOFT layers: butterfly products of block-diagonal rotations on the input, scaled outputs.

Each adapter stores ``boft_R`` (m, n, b, b) (m butterfly factors, n blocks of size b, n·b =
in) and ``boft_s`` (out, 1), PEFT's keys and shapes. Factor i is ``P_i · block_diag(Q_i) · P_iᵀ``
with ``Q_i`` the Cayley maps of the skew parts ``(R - Rᵀ)/2`` and ``P_i`` PEFT's block
butterfly permutation (the identity for i = 0 and whenever m = 1); the layer computes
``s ⊙ (base(x · F_{m-1} ⋯ F_0) - bias) + bias``. Permutations are applied as index gathers and
blocks block by block, so no (in, in) matrix is formed in the forward pass.

PEFT without its compiled CUDA extension (any CPU run) silently trains one factor whatever
``boft_n_butterfly_factor`` says, and writes ``boft_R`` as (1, n, b, b). Such a file loads here as
the one-factor adapter it is, so it computes what it computed in PEFT.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ...config import AdapterConfig, BOFTConfig
from ..method import FILE_PREFIX, LayerMethod, register_method
from .layer import InputMapLayer
from .maps import cayley, dropped_blocks_mask, identity_blocks, permute_features, rotate_blocks


def boft_blocks(in_features: int, config: BOFTConfig, key: str) -> tuple[int, int]:
    """(blocks per factor, block size) for a layer ``in_features`` wide, with PEFT's checks."""
    extra = config.boft_n_butterfly_factor - 1  # butterfly levels beyond plain block-diagonal OFT
    where = f"BOFT at {key!r} (input width {in_features})"
    if 2 ** min(extra, in_features.bit_length()) > in_features:  # checked before 2**extra is ever formed
        raise ValueError(f"{where}: boft_n_butterfly_factor={config.boft_n_butterfly_factor} needs at least "
                         f"2^{extra} features")
    if config.boft_block_num:
        num = config.boft_block_num
        if in_features % num:
            raise ValueError(f"{where}: boft_block_num={num} must divide the input width")
        if extra and (extra > int(math.log2(num)) or num % (2 ** extra)):
            raise ValueError(f"{where}: boft_block_num={num} must be a multiple of 2^(boft_n_butterfly_factor-1) "
                             f"= {2 ** extra}")
        size = in_features // num
    else:
        size = config.boft_block_size
        if in_features % size:
            raise ValueError(f"{where}: boft_block_size={size} must divide the input width")
        if extra and in_features % (size * 2 ** extra):
            raise ValueError(f"{where}: boft_block_size × 2^(boft_n_butterfly_factor-1) = {size * 2 ** extra} must "
                             "divide the input width")
        num = in_features // size
    if extra and (num % 2 or size % 2):
        raise ValueError(f"{where}: with butterfly factors, the block count ({num}) and size ({size}) must be even")
    return num, size


def butterfly_permutation(width: int, groups: int, chunk: int) -> torch.Tensor:
    """PEFT's block butterfly permutation: split the features into ``groups`` equal groups, each
    into chunks of ``chunk``; within a group the even-numbered chunks come first, then the odd."""
    group = width // groups
    chunks = group // chunk
    order = [c for c in range(0, chunks, 2)] + [c for c in range(1, chunks, 2)]
    within = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in order])
    return (torch.arange(0, width, group).unsqueeze(1) + within).flatten()


class BOFTLinear(InputMapLayer):
    """BOFT around a linear-like layer."""

    adapter_dict_names = ("boft_R", "boft_s")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_dropout: dict[str, float] = {}
        # Per adapter and factor: (gather before the blocks, gather after), None for the identity.
        self._permutations: dict[str, list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.boft_dropout.pop(name, None)
        self._permutations.pop(name, None)

    def add(self, name: str, config: BOFTConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        num, size = boft_blocks(in_features, config, key)
        factors = config.boft_n_butterfly_factor
        rotation = torch.zeros(factors, num, size, size)
        scale = torch.ones(out_features, 1)
        if not from_file and not config.init_weights:
            nn.init.normal_(rotation, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[name] = nn.Parameter(rotation)
        self.boft_s[name] = nn.Parameter(scale)
        self.boft_dropout[name] = config.boft_dropout
        self.scaling[name] = 1.0
        self._set_permutations(name)
        self.match_device(name)

    def _set_permutations(self, name: str) -> None:
        factors, num, size, _ = self.boft_R[name].shape
        in_features, _ = self.in_out
        perms: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        for i in range(factors):
            if factors == 1:
                perms.append((None, None))
                continue
            perm = butterfly_permutation(in_features, num // 2 ** i, size // 2)
            perms.append((torch.argsort(perm), perm))  # x @ P = x[..., P⁻¹]; x @ Pᵀ = x[..., P]
        self._permutations[name] = perms

    def use_one_factor(self, name: str) -> None:
        """Drop to one factor (a file written by PEFT without its CUDA extension)."""
        old = self.boft_R[name]
        self.boft_R[name] = nn.Parameter(old.detach()[:1].clone(), requires_grad=old.requires_grad)
        self._set_permutations(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R[name], "boft_s": self.boft_s[name]}

    def output_scale(self, name: str) -> Optional[torch.Tensor]:
        return self.boft_s[name].squeeze(-1)

    def map_input(self, name: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        weights = self.boft_R[name]
        factors, num, size, _ = weights.shape
        flat = weights.reshape(factors * num, size, size)
        skew = 0.5 * (flat - flat.transpose(-2, -1))
        blocks = cayley(skew.float()).to(weights.dtype).view(factors, num, size, size)
        p = self.boft_dropout[name]
        if training and p > 0:  # PEFT's rule: in one random factor, that fraction of blocks is the identity
            chosen = int(torch.randint(0, factors, (1,)).item())
            kept = identity_blocks(blocks[chosen], dropped_blocks_mask(num, p, blocks.device))
            blocks = torch.cat([blocks[:chosen], kept.unsqueeze(0), blocks[chosen + 1:]])
        for i in range(factors - 1, -1, -1):  # x · F_{m-1} ⋯ F_0: the last factor acts first
            before, after = self._permutations[name][i]
            if before is not None and before.device != x.device:
                before, after = before.to(x.device), after.to(x.device)
                self._permutations[name][i] = (before, after)
            x = permute_features(rotate_blocks(permute_features(x, before), blocks[i]), after)
        return x


class BOFTMethod(LayerMethod):
    """BOFT layers; also reads PEFT's one-factor files (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(BOFTLinear, bias_only="boft_only")

    def prepare_load(self, model: nn.Module, name: str, config: AdapterConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        narrowed = False
        for key, layer in model.named_modules():
            if not (isinstance(layer, BOFTLinear) and layer.has_adapter(name)):
                continue
            stored = tensors.get(f"{FILE_PREFIX}{key}.boft_R")
            current = layer.boft_R[name]
            if stored is not None and stored.dim() == 4 and stored.shape[0] == 1 and current.shape[0] > 1 \
                    and tuple(stored.shape[1:]) == tuple(current.shape[1:]):
                layer.use_one_factor(name)
                narrowed = True
        if narrowed:
            warnings.warn(f"adapter {name!r}: the file holds one butterfly factor per layer although its config says "
                          f"boft_n_butterfly_factor={config.boft_n_butterfly_factor} (PEFT without its CUDA extension "
                          "writes such files); loaded as the one-factor adapter it was trained as")


register_method("BOFT", BOFTMethod())
