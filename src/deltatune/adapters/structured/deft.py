"""DEFT layers: remove an r-dimensional part of the frozen weight and inject a learned one.

Per adapter, ``deft_P`` (out, r) and ``deft_R`` (r, in; absent with ``para``). From ``P`` come
``Q_P`` and ``right`` (``relu``: ``P`` and ``relu(P)``; ``qr``: the QR factor ``Q`` of ``P`` twice),
and the adapted weight ``(I − Q_P·rightᵀ)·W + Q_P·s·R`` is ``W + ΔW`` with
``ΔW = Q_P·(s·R − rightᵀ·W)`` (``−Q_P·rightᵀ·W`` for PaRa). Only rank-r products are formed:
``M = rightᵀ·W`` (r, in) from the base weight (dequantized for a 4-bit base), then
``x ↦ (x·(s·R − M)ᵀ)·Q_Pᵀ``. The projection is computed in float32, as PEFT computes it.
``ΔW`` depends on ``W``: merging uses the unmerged weight, and unmerging restores it exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...config import DeftConfig
from ..linear_base import WeightDeltaLayer, check_linear_like
from ..method import LayerMethod, register_method


class DeftLinear(WeightDeltaLayer):
    adapter_dict_names = ("deft_P", "deft_R")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.deft_P = nn.ParameterDict()
        self.deft_R = nn.ParameterDict()  # only adapters without para
        self.deft_dropout = nn.ModuleDict()
        self.decomposition: dict[str, str] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.decomposition.pop(name, None)
        if name in self.deft_dropout:
            del self.deft_dropout[name]

    def add(self, name: str, config: DeftConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        r = min(config.r, out_features)  # a projection of the output space has rank ≤ out
        self.decomposition[name] = config.decomposition_method
        self.scaling[name] = config.alpha / r if config.alpha else 1.0
        self.deft_P[name] = nn.Parameter(torch.randn(out_features, r) * 0.02)
        if not config.para:
            self.deft_R[name] = nn.Parameter(torch.randn(r, in_features) * (0.02 * config.init_scale))
        p = config.deft_dropout
        self.deft_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.match_device(name)
        if config.init_weights and not config.para and not from_file and not self.base_weight().is_meta:
            with torch.no_grad():  # R = rightᵀ·W / s: the removed part is injected back, ΔW = 0
                removed = self._removed(name, self._canonical_weight())
                self.deft_R[name].copy_(removed / self.scaling[name])

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {"deft_P": self.deft_P[name]}
        if name in self.deft_R:
            out["deft_R"] = self.deft_R[name]
        return out

    def _canonical_weight(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The base weight (or ``weight``, stored layout) as float32 (out, in)."""
        weight = self.base_weight() if weight is None else weight
        return self.canonical(weight.detach()).float()

    def _projection(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_P, right), float32, with ``P_proj = Q_P · rightᵀ``."""
        P = self.deft_P[name].float()
        if self.decomposition[name] == "qr":
            Q = torch.linalg.qr(P).Q
            return Q, Q
        return P, torch.relu(P)

    def _removed(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``M = rightᵀ · W`` (r, in): what the projection takes out of ``weight`` (float32, (out, in))."""
        _, right = self._projection(name)
        return right.T @ weight

    def _injected(self, name: str) -> torch.Tensor:
        return self.deft_R[name].float() * self.scaling[name]

    def delta_weight(self, name: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``ΔW`` (out, in) float32 against ``weight`` (stored layout; default: the base weight)."""
        W = self._canonical_weight(weight)
        Q, _ = self._projection(name)
        removed = self._removed(name, W)
        if name not in self.deft_R:
            return -(Q @ removed)
        return Q @ (self._injected(name) - removed)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        Q, _ = self._projection(name)
        removed = self._removed(name, self._canonical_weight())
        x = x.float()
        dropout = self.deft_dropout[name]
        if name not in self.deft_R:
            inner = -nn.functional.linear(x, removed)
        elif isinstance(dropout, nn.Identity) or not self.training:
            inner = nn.functional.linear(x, self._injected(name) - removed)
        else:  # dropout on the injected part's input only, as PEFT applies it
            inner = nn.functional.linear(dropout(x), self._injected(name)) - nn.functional.linear(x, removed)
        return result + nn.functional.linear(inner, Q).to(result.dtype)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        # ΔW from the unmerged weight, so several adapters merge as forward applies them
        delta = self.delta_weight(name, original).to(weight.device)
        return self.canonical(self.canonical(weight) + delta)


class DeftMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(DeftLinear, self._make, bias_only="deft_only")

    @staticmethod
    def _make(module: nn.Module, config: DeftConfig, key: str) -> DeftLinear:
        check_linear_like(module, "DEFT")
        return DeftLinear(module, config.fan_in_fan_out)


register_method("DEFT", DeftMethod())
