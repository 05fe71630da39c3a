"""VeRA layers: one pair of frozen random matrices shared by all layers, two learned vectors per layer.

``ΔW = diag(λ_b) · B[:out] · diag(λ_d) · A[:, :in]`` where ``A`` (r, max in) and ``B`` (max out, r)
are drawn once per adapter from ``projection_prng_key`` (the same values PEFT draws, so files
without projections rebuild them). Files hold ``vera_lambda_b``/``vera_lambda_d`` per layer
and, with ``save_projection``, ``base_model.vera_A``/``base_model.vera_B``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import VeraConfig
from ..linear_base import LinearAdapterLayer
from ..method import register_method
from ..shared import SharedTensors, seeded_kaiming_uniform
from .seeded_projections import SeededProjectionMethod

PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


class VeraLinear(LinearAdapterLayer):
    adapter_dict_names = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module, shared: SharedTensors, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self._shared = (shared,)  # a reference, not a submodule: the holder is registered once on the model

    def _forget(self, name: str) -> None:
        super()._forget(name)
        if name in self.vera_dropout:
            del self.vera_dropout[name]

    def add(self, name: str, config: VeraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        _, out_features = self.in_out
        self.scaling[name] = 1.0
        self.vera_lambda_b[name] = nn.Parameter(torch.ones(out_features))
        self.vera_lambda_d[name] = nn.Parameter(torch.randn(config.r))
        if config.init_weights:  # λ_b = 0: the adapter starts as a no-op
            with torch.no_grad():
                self.vera_lambda_d[name].fill_(config.d_initial)
                self.vera_lambda_b[name].zero_()
        self.vera_dropout[name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b[name], "vera_lambda_d": self.vera_lambda_d[name]}

    def _projections(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        in_features, out_features = self.in_out
        A = self._shared[0].get("vera_A", name)[:, :in_features]
        B = self._shared[0].get("vera_B", name)[:out_features, :]
        return A.to(dtype), B.to(dtype)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        A, B = self._projections(name, lambda_d.dtype)
        x = self.vera_dropout[name](x.to(lambda_d.dtype))
        return result + lambda_b * nn.functional.linear(lambda_d * nn.functional.linear(x, A), B)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self._projections(name, torch.float32)
        lambda_b = self.vera_lambda_b[name].float().unsqueeze(-1)
        lambda_d = self.vera_lambda_d[name].float().unsqueeze(-1)
        return (lambda_b * B) @ (lambda_d * A)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return self.canonical(self.canonical(weight) + self.delta_weight(name).to(weight.device))


class VeraMethod(SeededProjectionMethod):
    projection_keys = PROJECTION_KEYS
    bias_only = "vera_only"
    method_name = "VeRA"

    def __init__(self) -> None:
        super().__init__(VeraLinear)

    def make_shared(self, config: VeraConfig, in_max: int, out_max: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        vera_A = seeded_kaiming_uniform((config.r, in_max), generator)  # drawn first, as PEFT draws them
        return {"vera_A": vera_A, "vera_B": seeded_kaiming_uniform((out_max, config.r), generator)}


register_method("VERA", VeraMethod())
