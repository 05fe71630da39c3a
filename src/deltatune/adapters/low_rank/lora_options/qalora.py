"""QA-LoRA (``use_qalora``, ``qalora_group_size``): LoRA whose A reads the input pooled in groups.

The input's features are averaged in groups of ``qalora_group_size`` and A maps the
``in / group`` pooled features, so the update is constant within each group, as the weight's
quantization groups are (the paper's point: the merged update stays group-wise). PEFT's
formula, kept exactly: ``Δy = scale · B A (mean_g(x) · in/group)`` (the pooled mean is
multiplied by the number of groups), no LoRA bias; A is stored as ``(r, in / group)``.

PEFT 0.21.2 applies QA-LoRA on GPTQ layers only and ignores the flag on other layers (their A
stays full size). deltatune pools on every linear base; a file whose A is full size (written
by PEFT for a non-GPTQ layer) loads as the plain LoRA that PEFT ran.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..lora import LoraLayer, LoraLinear
from .lora_variant import LoraVariant


class QALoraVariant(LoraVariant):
    """Group-pooled input to A on one layer."""

    def __init__(self, group_size: int):
        self.group_size = group_size

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B, scale = layer.live_factors(name)
        x = layer.lora_dropout[name](x.to(A.dtype))
        features = x.shape[-1]
        groups = features // self.group_size
        pooled = x.reshape(-1, groups, self.group_size).mean(dim=2) * groups
        delta = pooled @ A.T @ B.T * scale
        return (result + delta.view(*x.shape[:-1], delta.shape[-1])).to(result.dtype)

    def delta_weight(self, layer: nn.Module, name: str) -> Optional[torch.Tensor]:
        # pooling is linear: A read back at full width is each group's column, times groups / size
        A, B = layer.factors(name)
        groups = A.shape[1]
        wide = A.float().repeat_interleave(self.group_size, dim=1) * (groups / self.group_size)
        return (B.float() @ wide) * layer.scaling[name]


def attach_qalora(model: nn.Module, name: str, group_size: int) -> None:
    """Give adapter ``name`` QA-LoRA's pooled A on every layer that holds it."""
    for key, layer in model.named_modules():
        if not (isinstance(layer, LoraLayer) and layer.has_adapter(name)):
            continue
        if not isinstance(layer, LoraLinear):
            raise ValueError(f"LoraConfig.use_qalora: module {key!r} is a {type(layer.base_layer).__name__}; "
                             "QA-LoRA adapts linear layers only")
        features = layer.in_out[0]
        if features % group_size:
            raise ValueError(f"LoraConfig.use_qalora: module {key!r} has {features} input features, not a "
                             f"multiple of qalora_group_size={group_size}")
        old = layer.lora_A[name].weight
        # a fresh nn.Linear's own initialisation, as PEFT's QA-LoRA layers start (B is zero)
        layer.lora_A[name] = nn.Linear(features // group_size, old.shape[0], bias=False,
                                       device=old.device, dtype=old.dtype)
        layer.variants[name] = QALoraVariant(group_size)


def match_file_layout(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Layers whose file A is full size (PEFT ignored ``use_qalora`` there) run plain LoRA."""
    plain = []
    for key, layer in model.named_modules():
        if not (isinstance(layer, LoraLinear) and isinstance(layer.variants.get(name), QALoraVariant)):
            continue
        stored = tensors.get(f"{prefix}{key}.lora_A.weight")
        features = layer.in_out[0]
        if stored is not None and stored.dim() == 2 and stored.shape[1] == features != layer.lora_A[name].in_features:
            old = layer.lora_A[name].weight
            layer.lora_A[name] = nn.Linear(features, old.shape[0], bias=False, device=old.device, dtype=old.dtype)
            layer.lora_A[name].weight.requires_grad_(old.requires_grad)
            del layer.variants[name]
            plain.append(key)
    if plain:
        warnings.warn(f"use_qalora=True, but the file's lora_A of {len(plain)} layer(s) ({plain[0]}, ...) is full "
                      "size: PEFT ran plain LoRA there (it pools on GPTQ layers only), and so does deltatune")
