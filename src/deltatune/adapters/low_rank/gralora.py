"""GraLoRA layers: a LoRA update cut into a k × k grid of blocks, plus an optional plain LoRA.

Per adapter, ``gralora_A`` (k, in/k, r) maps each of the k input parts to r numbers and
``gralora_B`` (k, r, out/k) maps r numbers to each of the k output parts. The r numbers of
input part ``n`` are cut into k chunks of ``s = r/k``; chunk ``j`` goes to output part ``j``,
which reads the k chunks sent to it (one per input part) in input-part order. So the block
(j, n) of ``ΔW`` is ``B[j][n·s:(n+1)·s]ᵀ · A[n][:, j·s:(j+1)·s]ᵀ``: rank ``s`` per block, rank
up to ``r·k`` overall. With ``hybrid_r`` > 0, ``gralora_A_general`` (hybrid_r, in) and
``gralora_B_general`` (out, hybrid_r) add a plain LoRA. Both parts are scaled by
``alpha / (r + hybrid_r)``. That is PEFT's layout, so files map one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config import GraloraConfig
from ..linear_base import WeightDeltaLayer, check_linear_like
from ..method import LayerMethod, register_method


class GraloraLinear(WeightDeltaLayer):
    adapter_dict_names = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.gralora_A = nn.ParameterDict()
        self.gralora_B = nn.ParameterDict()
        self.gralora_A_general = nn.ParameterDict()  # only adapters with hybrid_r > 0
        self.gralora_B_general = nn.ParameterDict()
        self.gralora_dropout = nn.ModuleDict()
        self.blocks: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.blocks.pop(name, None)
        if name in self.gralora_dropout:
            del self.gralora_dropout[name]

    def add(self, name: str, config: GraloraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        k, r, hybrid = config.gralora_k, config.r, config.hybrid_r
        if in_features % k or out_features % k:
            raise ValueError(f"GraloraConfig.gralora_k={k} must divide the input ({in_features}) and output "
                             f"({out_features}) sizes of module {key!r}")
        # each block's A drawn as a (r, in/k) matrix, as a LoRA A of that size would be
        A = torch.stack([nn.init.kaiming_uniform_(torch.empty(r, in_features // k), a=math.sqrt(5)).T
                         for _ in range(k)])
        B = torch.zeros(k, r, out_features // k)
        if not config.init_weights:  # both factors random (tests): the adapter changes outputs from the start
            B = torch.stack([nn.init.kaiming_uniform_(torch.empty(out_features // k, r), a=math.sqrt(5)).T
                             for _ in range(k)])
        self.gralora_A[name] = nn.Parameter(A.contiguous())
        self.gralora_B[name] = nn.Parameter(B.contiguous())
        if hybrid > 0:
            A_general = nn.init.kaiming_uniform_(torch.empty(hybrid, in_features), a=math.sqrt(5))
            B_general = torch.empty(out_features, hybrid)
            if config.init_weights:
                B_general.zero_()
            else:
                nn.init.kaiming_uniform_(B_general, a=math.sqrt(5))
            self.gralora_A_general[name] = nn.Parameter(A_general)
            self.gralora_B_general[name] = nn.Parameter(B_general)
        p = config.gralora_dropout
        self.gralora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.blocks[name] = k
        self.scaling[name] = config.alpha / (r + hybrid)
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {"gralora_A": self.gralora_A[name], "gralora_B": self.gralora_B[name]}
        if name in self.gralora_A_general:  # PEFT's hybrid parts are nn.Linear modules: ".weight"
            out["gralora_A_general.weight"] = self.gralora_A_general[name]
            out["gralora_B_general.weight"] = self.gralora_B_general[name]
        return out

    def _block_product(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., in) through the block grid, unscaled: (..., out)."""
        A, B, k = self.gralora_A[name], self.gralora_B[name], self.blocks[name]
        lead = x.shape[:-1]
        h = torch.einsum("...ni,nir->...nr", x.reshape(*lead, k, -1), A)  # (..., k_in, r)
        # chunk j of every input part's r numbers goes to output part j
        h = h.reshape(*lead, k, k, -1).transpose(-3, -2).reshape(*lead, k, -1)  # (..., k_out, r)
        return torch.einsum("...jr,jro->...jo", h, B).reshape(*lead, -1)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A = self.gralora_A[name]
        x = self.gralora_dropout[name](x.to(A.dtype))
        update = self._block_product(name, x)
        if name in self.gralora_A_general:
            update = update + nn.functional.linear(nn.functional.linear(x, self.gralora_A_general[name]),
                                                   self.gralora_B_general[name])
        return result + self.scaling[name] * update.to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B, k = self.gralora_A[name].float(), self.gralora_B[name].float(), self.blocks[name]
        in_part, r = A.shape[1], A.shape[2]
        out_part = B.shape[2]
        s = r // k
        # A as (input part n, i, output part j, s); B as (output part j, input part n, s, o)
        delta = torch.einsum("nijs,jnso->joni", A.reshape(k, in_part, k, s), B.reshape(k, k, s, out_part))
        delta = delta.reshape(k * out_part, k * in_part)
        if name in self.gralora_A_general:
            delta = delta + self.gralora_B_general[name].float() @ self.gralora_A_general[name].float()
        return delta * self.scaling[name]


class GraloraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(GraloraLinear, self._make, bias_only="gralora_only")

    @staticmethod
    def _make(module: nn.Module, config: GraloraConfig, key: str) -> GraloraLinear:
        check_linear_like(module, "GraLoRA")
        return GraloraLinear(module, config.fan_in_fan_out)


register_method("GRALORA", GraloraMethod())
