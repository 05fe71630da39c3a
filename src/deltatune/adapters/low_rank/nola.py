"""NOLA layers: LoRA factors as learned mixtures of frozen random bases shared by all layers.

``A = Σ_i a_i · basis_A[i][:, :in]`` and ``B = Σ_j b_j · basis_B[j][:out]``; the update is
``(alpha / r) · B @ A``. The bases (``num_basis_A`` × (r, max in) and ``num_basis_B`` ×
(max out, r)) are drawn from ``basis_seed`` on a CPU generator, so they are rebuilt exactly
and never stored. File format (deltatune's own, same two-file layout as PEFT):
``adapter_config.json`` with ``"peft_type": "NOLA"`` and the fields of ``NolaConfig``;
``adapter_model.safetensors`` with ``base_model.model.<module>.nola_coef_A`` (num_basis_A,)
and ``...nola_coef_B`` (num_basis_B,) per targeted module. ``b`` starts at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config import NolaConfig
from ..linear_base import LinearAdapterLayer
from ..method import register_method
from ..shared import SharedTensorMethod, SharedTensors, seeded_kaiming_uniform


class NolaLinear(LinearAdapterLayer):
    adapter_dict_names = ("nola_coef_A", "nola_coef_B")

    def __init__(self, base_layer: nn.Module, shared: SharedTensors, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.nola_coef_A = nn.ParameterDict()
        self.nola_coef_B = nn.ParameterDict()
        self.nola_dropout = nn.ModuleDict()
        self._shared = (shared,)

    def _forget(self, name: str) -> None:
        super()._forget(name)
        if name in self.nola_dropout:
            del self.nola_dropout[name]

    def add(self, name: str, config: NolaConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.scaling[name] = config.alpha / config.r
        # a ~ N(0, 1/k): the mixture has about the spread of one basis matrix (a Kaiming init)
        self.nola_coef_A[name] = nn.Parameter(torch.randn(config.num_basis_A) / math.sqrt(config.num_basis_A))
        coef_B = torch.zeros(config.num_basis_B) if config.init_weights else torch.randn(config.num_basis_B)
        self.nola_coef_B[name] = nn.Parameter(coef_B / (1 if config.init_weights else math.sqrt(config.num_basis_B)))
        self.nola_dropout[name] = nn.Dropout(config.nola_dropout) if config.nola_dropout > 0 else nn.Identity()
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"nola_coef_A": self.nola_coef_A[name], "nola_coef_B": self.nola_coef_B[name]}

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) for adapter ``name`` in the coefficients' dtype."""
        in_features, out_features = self.in_out
        coef_A, coef_B = self.nola_coef_A[name], self.nola_coef_B[name]
        basis_A = self._shared[0].get("nola_basis_A", name)[:, :, :in_features].to(coef_A.dtype)
        basis_B = self._shared[0].get("nola_basis_B", name)[:, :out_features, :].to(coef_B.dtype)
        return torch.einsum("k,kri->ri", coef_A, basis_A), torch.einsum("k,kor->or", coef_B, basis_B)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = self.factors(name)
        x = self.nola_dropout[name](x.to(A.dtype))
        return result + nn.functional.linear(nn.functional.linear(x, A), B) * self.scaling[name]

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        A, B = self.factors(name)
        delta = (B.float() @ A.float()) * self.scaling[name]
        return self.canonical(self.canonical(weight) + delta.to(weight.device))


class NolaMethod(SharedTensorMethod):
    method_name = "NOLA"

    def __init__(self) -> None:
        super().__init__(NolaLinear)

    def make_shared(self, config: NolaConfig, in_max: int, out_max: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(config.basis_seed)
        # each basis matrix gets Kaiming's bound for its own fan-in (in for A, r for B)
        basis_A = seeded_kaiming_uniform((config.num_basis_A * config.r, in_max), generator)
        basis_B = seeded_kaiming_uniform((config.num_basis_B * out_max, config.r), generator)
        return {"nola_basis_A": basis_A.view(config.num_basis_A, config.r, in_max),
                "nola_basis_B": basis_B.view(config.num_basis_B, out_max, config.r)}


register_method("NOLA", NolaMethod())
