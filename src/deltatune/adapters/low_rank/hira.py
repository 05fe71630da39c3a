"""HiRA layers: a low-rank product that scales the frozen weight entry by entry.

``ΔW = W0 ⊙ (B A)`` with ``A`` (r, in) and ``B`` (out, r); ``W0`` is the unmerged base weight
(dequantized for a 4-bit base), so the update can have full rank while training only
``r · (in + out)`` values. Forward forms ``ΔW`` (full size) and adds ``x ΔWᵀ``, as PEFT does.
Files hold ``hira_A``/``hira_B`` per layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config.low_rank import HiraConfig
from ...targeting import pattern_value
from ..linear_base import WeightDeltaLayer, check_linear_like
from ..method import FILE_PREFIX, LayerMethod, register_method


class HiraLinear(WeightDeltaLayer):
    adapter_dict_names = ("hira_A", "hira_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)  # GPT-2's Conv1D is recognised as transposed by its type
        self.hira_A = nn.ParameterDict()
        self.hira_B = nn.ParameterDict()
        self.hira_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.r.pop(name, None)
        if name in self.hira_dropout:
            del self.hira_dropout[name]

    def add(self, name: str, config: HiraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        r = pattern_value(config.rank_pattern or {}, key, config.r)
        A, B = torch.randn(r, in_features), torch.randn(out_features, r)  # init False/None: both stay random
        init = config.init_weights
        if init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # LoRA's A
            B.zero_()
        elif isinstance(init, str):  # "gaussian"
            nn.init.normal_(A, std=1 / r)
            B.zero_()
        self.hira_A[name] = nn.Parameter(A)
        self.hira_B[name] = nn.Parameter(B)
        self.hira_dropout[name] = nn.Dropout(config.hira_dropout) if config.hira_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.scaling[name] = 1.0
        self.match_device(name)

    def resize(self, name: str, r: int) -> None:
        """Give adapter ``name`` rank ``r`` here (a file's shapes win over the config's pattern)."""
        in_features, out_features = self.in_out
        A = self.hira_A[name]
        self.hira_A[name] = nn.Parameter(A.new_zeros(r, in_features), requires_grad=A.requires_grad)
        self.hira_B[name] = nn.Parameter(A.new_zeros(out_features, r), requires_grad=A.requires_grad)
        self.r[name] = r

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"hira_A": self.hira_A[name], "hira_B": self.hira_B[name]}

    def frozen_weight(self) -> torch.Tensor:
        """``W0`` in (out, in) layout: the weight before any merge, dequantized for a 4-bit base."""
        return self.canonical(self.unmerged_weight().detach())

    def _product(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.hira_B[name].to(dtype) @ self.hira_A[name].to(dtype)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dtype = self.hira_A[name].dtype
        delta = self.frozen_weight().to(dtype) * self._product(name, dtype)
        x = self.hira_dropout[name](x.to(dtype))
        return result + nn.functional.linear(x, delta).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` in (out, in) layout, float32."""
        return self.frozen_weight().float() * self._product(name, torch.float32)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        # ``original`` is W0 (float32, stored layout) whatever was merged before, as in the forward pass
        delta = self.canonical(original) * self._product(name, torch.float32).detach().to(weight.device)
        return self.canonical(self.canonical(weight) + delta)


class HiraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(HiraLinear, self._make)

    @staticmethod
    def _make(module: nn.Module, config: HiraConfig, key: str) -> HiraLinear:
        check_linear_like(module, "HiRA")
        # the layer's type decides its layout, as PEFT's HiRA decides it (fan_in_fan_out is overridden there)
        return HiraLinear(module)

    def prepare_load(self, model: nn.Module, name: str, config: HiraConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """Ranks come from the file: PEFT builds a model's first adapter at ``r`` whatever
        ``rank_pattern`` says, so its files may disagree with the pattern."""
        for key, layer in model.named_modules():
            if isinstance(layer, HiraLinear) and layer.has_adapter(name):
                saved = tensors.get(f"{FILE_PREFIX}{key}.hira_A")
                if saved is not None and saved.dim() == 2 and saved.shape[0] != layer.r[name]:
                    layer.resize(name, saved.shape[0])


register_method("HIRA", HiraMethod())
