"""PVeRA layers: VeRA with a probabilistic middle.

The shared frozen projections are ``A`` (2r, max in) and ``B`` (max out, r), drawn once per
adapter from ``projection_prng_key`` in PEFT's order (A first). Each layer learns ``λ_d`` (2r)
and ``λ_b`` (out). ``h = λ_d · (A[:, :in] x)`` is split into a mean ``μ`` (first r) and a
log-variance (last r); the output adds ``λ_b · B[:out] z`` with ``z = μ`` at inference and
``z = μ + ε·exp(logvar/2)`` in training (or always, with ``sample_at_inference``). ``ε`` comes
from a CPU generator per layer seeded with ``generator_seed``, as PEFT draws it, or from
torch's global generator when no seed is set. Merging folds in the mean path only.
Files hold ``pvera_lambda_b``/``pvera_lambda_d`` per layer and, with ``save_projection``,
``base_model.pvera_A``/``base_model.pvera_B``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...config.low_rank import PveraConfig
from ...targeting import find_targets
from ..linear_base import LinearAdapterLayer
from ..method import register_method
from ..shared import SharedTensors, seeded_kaiming_uniform
from .seeded_projections import SeededProjectionMethod

PROJECTION_KEYS = {"pvera_A": "base_model.pvera_A", "pvera_B": "base_model.pvera_B"}


class PveraLinear(LinearAdapterLayer):
    adapter_dict_names = ("pvera_lambda_b", "pvera_lambda_d")

    def __init__(self, base_layer: nn.Module, shared: SharedTensors, fan_in_fan_out: bool = False):
        # the layer's type decides its layout (GPT-2's Conv1D is transposed), as PEFT's PVeRA
        # overrides fan_in_fan_out; the flag is kept in the config for the file only
        super().__init__(base_layer)
        self.pvera_lambda_b = nn.ParameterDict()
        self.pvera_lambda_d = nn.ParameterDict()
        self.pvera_dropout = nn.ModuleDict()
        self.sample_at_inference: dict[str, bool] = {}
        self.generators: dict[str, Optional[torch.Generator]] = {}
        self._shared = (shared,)  # a reference, not a submodule: the holder is registered once on the model

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.sample_at_inference.pop(name, None)
        self.generators.pop(name, None)
        if name in self.pvera_dropout:
            del self.pvera_dropout[name]

    def add(self, name: str, config: PveraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        _, out_features = self.in_out
        self.scaling[name] = 1.0
        self.pvera_lambda_b[name] = nn.Parameter(torch.ones(out_features))
        self.pvera_lambda_d[name] = nn.Parameter(torch.randn(2 * config.r))
        if config.init_weights:  # λ_b = 0: the adapter starts as a no-op
            with torch.no_grad():
                self.pvera_lambda_d[name].fill_(config.d_initial)
                self.pvera_lambda_b[name].zero_()
        self.pvera_dropout[name] = nn.Dropout(config.pvera_dropout) if config.pvera_dropout > 0 else nn.Identity()
        self.sample_at_inference[name] = config.sample_at_inference
        # one generator per layer, each seeded alike (PEFT's rule), so noise is reproducible per layer
        self.generators[name] = (None if config.generator_seed is None
                                 else torch.Generator().manual_seed(config.generator_seed))
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"pvera_lambda_b": self.pvera_lambda_b[name], "pvera_lambda_d": self.pvera_lambda_d[name]}

    def _projections(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        in_features, out_features = self.in_out
        A = self._shared[0].get("pvera_A", name)[:, :in_features]
        B = self._shared[0].get("pvera_B", name)[:out_features, :]
        return A.to(dtype), B.to(dtype)

    def _sample(self, name: str, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.sample_at_inference[name]):
            return mean
        std = torch.exp(0.5 * logvar)
        generator = self.generators[name]
        if generator is None:
            noise = torch.randn_like(std)
        else:  # drawn on the CPU, where the seeded generator lives, then moved
            noise = torch.randn(std.shape, dtype=std.dtype, generator=generator).to(std.device)
        return mean + noise * std

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lambda_b, lambda_d = self.pvera_lambda_b[name], self.pvera_lambda_d[name]
        A, B = self._projections(name, lambda_d.dtype)
        x = self.pvera_dropout[name](x.to(lambda_d.dtype))
        mean, logvar = (lambda_d * nn.functional.linear(x, A)).chunk(2, dim=-1)
        return result + lambda_b * nn.functional.linear(self._sample(name, mean, logvar), B)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The mean path's ``ΔW`` in (out, in) layout, float32."""
        A, B = self._projections(name, torch.float32)
        r = A.shape[0] // 2
        lambda_b = self.pvera_lambda_b[name].float().unsqueeze(-1)
        lambda_d = self.pvera_lambda_d[name].float()[:r].unsqueeze(-1)
        return (lambda_b * B) @ (lambda_d * A[:r])

    def merge_problem(self, name: str) -> Optional[str]:
        if self.sample_at_inference.get(name):
            return "PVeRA with sample_at_inference=True draws a new sample every forward pass; a merged weight cannot"
        return None

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return self.canonical(self.canonical(weight) + self.delta_weight(name).detach().to(weight.device))


class PveraMethod(SeededProjectionMethod):
    projection_keys = PROJECTION_KEYS
    bias_only = "pvera_only"
    method_name = "PVeRA"

    def __init__(self) -> None:
        super().__init__(PveraLinear)

    def prepare(self, model: nn.Module, config: PveraConfig) -> None:
        super().prepare(model, config)
        # PEFT's PVeRA rewrites fan_in_fan_out per targeted layer (True for Conv1D, False for
        # nn.Linear) and saves what the last one set: recorded the same way, so files match
        targets = find_targets(model, config)
        if targets:
            last = getattr(targets[-1][1], "base_layer", targets[-1][1])
            config.fan_in_fan_out = type(last).__name__ == "Conv1D"

    def make_shared(self, config: PveraConfig, in_max: int, out_max: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        pvera_A = seeded_kaiming_uniform((2 * config.r, in_max), generator)  # drawn first, as PEFT draws them
        return {"pvera_A": pvera_A, "pvera_B": seeded_kaiming_uniform((out_max, config.r), generator)}

    def training_state(self, model: nn.Module, name: str, config: PveraConfig) -> dict:
        """Each layer's seeded noise generator, so a resumed run draws the noise it would have drawn."""
        return {key: layer.generators[name].get_state() for key, layer in model.named_modules()
                if isinstance(layer, PveraLinear) and layer.generators.get(name) is not None}

    def load_training_state(self, model: nn.Module, name: str, config: PveraConfig, state: dict) -> None:
        for key, layer in model.named_modules():
            if key in state and isinstance(layer, PveraLinear) and layer.generators.get(name) is not None:
                layer.generators[name].set_state(state[key])


register_method("PVERA", PveraMethod())
