"""BD-LoRA (``use_bdlora``): LoRA with a block-diagonal A or B, for serving sharded models.

With ``nblocks`` = the tensor-parallel degree, a block-diagonal A on a row-sharded layer (or B
on a column-sharded one) keeps each shard's adapter local, so serving needs no extra
communication. ``use_bdlora`` is PEFT's ``BdLoraConfig`` as a dict: ``target_modules_bd_a`` /
``target_modules_bd_b`` (patterns matched as substrings of the module name), ``nblocks``,
``match_strict`` (every targeted module must match one list).

A block-diagonal factor is stored as PEFT stores it: its blocks stacked along the output,
``(out, in / nblocks)`` under the usual ``lora_A.weight`` / ``lora_B.weight`` key. A starts
Kaiming-uniform, B at zero, as PEFT's blocks do.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..lora import LoraLayer, LoraLinear
from .lora_variant import LoraVariant


class BlockDiagonalLinear(nn.Module):
    """A bias-free linear map whose (out, in) matrix is block-diagonal with ``nblocks`` equal blocks;
    ``weight`` holds the blocks stacked: block i is rows ``i·out/n .. (i+1)·out/n``."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, zero: bool,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, device=device, dtype=dtype))
        self.register_parameter("bias", None)  # read like nn.Linear(bias=False) by LoRA's bias checks
        if zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)  # PEFT's blocks use the default gain (a=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.nblocks
        blocks = x.reshape(*x.shape[:-1], n, self.in_features // n)
        w = self.weight.view(n, self.out_features // n, self.in_features // n)
        return torch.einsum("...bi,boi->...bo", blocks, w).reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        """The full (out, in) matrix, zeros off the diagonal blocks."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))


class BdLoraVariant(LoraVariant):
    """Plain LoRA through (possibly) block-diagonal factors."""

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[name], layer.lora_B[name]
        x = layer.lora_dropout[name](x).to(A.weight.dtype)
        return (result + B(A(x)) * layer.scaling[name]).to(result.dtype)

    def delta_weight(self, layer: nn.Module, name: str) -> Optional[torch.Tensor]:
        A, B = (m.dense() if isinstance(m, BlockDiagonalLinear) else m.weight
                for m in (layer.lora_A[name], layer.lora_B[name]))
        return (B.float() @ A.float()) * layer.scaling[name]


def attach_bdlora(model: nn.Module, name: str, settings: dict[str, Any]) -> None:
    """Make A or B of adapter ``name`` block-diagonal where ``settings``' patterns name the module."""
    on_a = settings.get("target_modules_bd_a") or []
    on_b = settings.get("target_modules_bd_b") or []
    nblocks = settings.get("nblocks", 1)
    strict = settings.get("match_strict", True)
    for key, layer in model.named_modules():
        if not (isinstance(layer, LoraLayer) and layer.has_adapter(name)):
            continue
        a, b = any(p in key for p in on_a), any(p in key for p in on_b)
        if a and b:
            raise ValueError(f"LoraConfig.use_bdlora: module {key!r} matches both target_modules_bd_a and _bd_b")
        if not (a or b):
            if strict:
                raise ValueError(f"LoraConfig.use_bdlora: module {key!r} matches neither target_modules_bd_a nor "
                                 "target_modules_bd_b; list it, or set match_strict=False to keep plain LoRA there")
            continue
        if not isinstance(layer, LoraLinear) or layer.transposed:
            raise ValueError(f"LoraConfig.use_bdlora: module {key!r} is a {type(layer.base_layer).__name__}; "
                             "BD-LoRA adapts nn.Linear layers only (as PEFT)")
        features, outputs = layer.in_out
        r = layer.r[name]
        size = features if a else outputs
        if size % nblocks or r % nblocks:
            raise ValueError(f"LoraConfig.use_bdlora: module {key!r}: nblocks={nblocks} must divide r={r} and "
                             f"its {'input' if a else 'output'} size {size}")
        old = layer.lora_A[name].weight
        if a:
            layer.lora_A[name] = BlockDiagonalLinear(features, r, nblocks, zero=False, device=old.device,
                                                     dtype=old.dtype)
        else:
            if layer.lora_B[name].bias is not None:
                raise ValueError(f"LoraConfig.use_bdlora: module {key!r}: a block-diagonal B has no bias "
                                 "(lora_bias=True)")
            layer.lora_B[name] = BlockDiagonalLinear(r, outputs, nblocks, zero=True, device=old.device,
                                                     dtype=old.dtype)
        layer.variants[name] = BdLoraVariant()
