"""KaSA (``kasa_config``): knowledge-aware singular-value adaptation (arXiv:2412.06071).

Two changes to LoRA: the base weight loses its ``r`` smallest singular components (the
"noisy long tail"), and the update has a learned diagonal between the factors,
``ΔW = scale · B diag(lora_diag) A``. PEFT's file holds ``lora_A``, ``lora_B`` and ``lora_diag``
(an r-vector, randn at the start; B starts at zero); the truncation is recomputed from the base
weight on load, as PEFT recomputes it.

PEFT truncates the base weight in place, for good. deltatune keeps the base weight and
subtracts the dropped components ``U_d S_d V_dᵀ x`` (rank r, computed once) in the adapter's
own update, so the outputs equal PEFT's while disabling, deleting or routing rows elsewhere
gives the untouched base, and other adapters see the original weight. Two KaSA adapters active
at once each subtract their own part of the original weight (PEFT would truncate twice).

``kasa_config``: PEFT's ``KasaConfig`` as a dict, ``beta`` (weight of ``Σ lora_diag²``) and
``gamma`` (weight of ``||BᵀB - I|| + ||AAᵀ - I||``); deltatune's training loop adds these
regularizers to the loss (``regularization``), which PEFT leaves to the user.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoraLayer, LoraLinear
from .lora_variant import LoraVariant


class KasaVariant(LoraVariant):
    """One KaSA adapter on one layer: the dropped base components, removed in the update."""

    def __init__(self, dropped_us: torch.Tensor, dropped_vh: torch.Tensor):
        self.dropped_us = dropped_us  # (out, r): U_d S_d
        self.dropped_vh = dropped_vh  # (r, in): V_dᵀ

    def _dropped(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dropped_us.device != device:  # follows the model when it moves
            self.dropped_us, self.dropped_vh = self.dropped_us.to(device), self.dropped_vh.to(device)
        return self.dropped_us, self.dropped_vh

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        us, vh = self._dropped(x.device)
        removed = F.linear(F.linear(x.to(vh.dtype), vh), us)
        A, B = layer.lora_A[name], layer.lora_B[name]
        update = B(A(layer.lora_dropout[name](x.to(A.weight.dtype))) * layer.lora_diag[name]) * layer.scaling[name]
        return (result - removed.to(result.dtype) + update).to(result.dtype)

    def delta_weight(self, layer: nn.Module, name: str) -> Optional[torch.Tensor]:
        A, B = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
        us, vh = self._dropped(A.device)
        return (B * layer.lora_diag[name].float()) @ A * layer.scaling[name] - us @ vh

    def file_tensors(self, layer: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return {"lora_diag": layer.lora_diag[name]}


def attach_kasa(model: nn.Module, name: str) -> None:
    """Give adapter ``name`` KaSA's diagonal and base truncation on every layer that holds it."""
    for key, layer in model.named_modules():
        if not (isinstance(layer, LoraLayer) and layer.has_adapter(name)):
            continue
        if not isinstance(layer, LoraLinear) or layer.transposed:
            raise ValueError(f"LoraConfig.kasa_config: module {key!r} is a {type(layer.base_layer).__name__}; KaSA "
                             "adapts nn.Linear layers only (PEFT refuses fan_in_fan_out layers too)")
        r = layer.r[name]
        weight = layer.base_weight().detach().float()
        if r >= min(weight.shape):
            raise ValueError(f"LoraConfig.kasa_config: module {key!r}: r={r} must be below min(in, out)="
                             f"{min(weight.shape)}, so that the truncated base keeps a component")
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        kept = S.shape[0] - r
        if not hasattr(layer, "lora_diag"):  # the first KaSA adapter: a dict the layer's bookkeeping walks
            layer.lora_diag = nn.ParameterDict()
            layer.adapter_dict_names = type(layer).adapter_dict_names + ("lora_diag",)
        A = layer.lora_A[name].weight
        layer.lora_diag[name] = nn.Parameter(torch.randn(r, device=A.device, dtype=A.dtype))
        layer.variants[name] = KasaVariant(U[:, kept:] * S[kept:], Vh[kept:])


def regularization(model: nn.Module, name: str, beta: float, gamma: float) -> Optional[torch.Tensor]:
    """KaSA's training regularizers (paper Eq. 9-11) summed over the layers of adapter ``name``."""
    total = None
    for layer in model.modules():
        if not (isinstance(layer, LoraLayer) and isinstance(layer.variants.get(name), KasaVariant)):
            continue
        diag = layer.lora_diag[name].float()
        A, B = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
        eye = torch.eye(diag.shape[0], device=diag.device)
        term = beta * (diag ** 2).sum() + gamma * (torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye))
        total = term if total is None else total + term
    return total
