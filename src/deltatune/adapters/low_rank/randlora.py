"""RandLoRA layers: a full-rank update built from frozen random low-rank bases shared by all
layers, each layer learning only how to scale them.

Shared per adapter (drawn from ``projection_prng_key``, sized for the largest targeted layer,
``S`` its smaller and ``L`` its larger side): ``A`` (r, 1, S) and ``n = ⌈S / r⌉`` bases ``B``
(L, n, r). A layer with sides ``s ≤ l`` uses ``n_l = ⌈s / r⌉`` bases and learns
``λ`` = ``randlora_lambda`` (r, n_l) and ``γ`` = ``randlora_gamma`` (n_l, s). With

    U = (λ[:, :, None] · A[:, :, :s] · γ[None]) flattened to (r·n_l, s)
    V = B[:l, :n_l] flattened to (l, n_l·r)

the update is ``ΔW = (randlora_alpha / r) · V U`` (or its transpose when the input is the
larger side): the sum of ``n_l`` rank-r terms, so the update can reach full rank. The row
orders of ``U`` and ``V`` pair the terms as PEFT pairs them (files mean the same numbers).

Files hold ``randlora_lambda`` and ``randlora_gamma`` per layer and, with ``save_projection``,
the shared ``A`` and ``B`` both once (``base_model.randlora_A``/``_B``) and in every layer
(``<layer>.randlora_A``/``_B``), as PEFT writes them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config.low_rank import RandLoraConfig
from ..linear_base import LinearAdapterLayer
from ..method import register_method
from ..shared import SharedTensors
from .seeded_projections import SeededProjectionMethod

PROJECTION_KEYS = {"randlora_A": "base_model.randlora_A", "randlora_B": "base_model.randlora_B"}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _kaiming_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform values (LoRA's ``a=√5``) drawn in bfloat16, as PEFT draws RandLoRA's bases,
    so that the same seed gives the same numbers."""
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """−1 below ``1/(2·sparsity)``, +1 above ``1 − 1/(2·sparsity)``, 0 between."""
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out


def randlora_bases(config: RandLoraConfig, in_max: int, out_max: int) -> dict[str, torch.Tensor]:
    """The shared ``A`` (r, 1, S) and ``B`` (L, n, r), each scaled to unit standard deviation."""
    large, small = max(in_max, out_max), min(in_max, out_max)
    count = _ceil_div(small, config.r)
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    if config.very_sparse or config.sparse:
        sparsity = math.sqrt(small) if config.very_sparse else 3
        A = _ternary(torch.rand((config.r, 1, small), generator=generator), sparsity)
        B = _ternary(torch.rand((large, count, config.r), generator=generator), sparsity)
    else:  # A first, then the bases of B one by one: PEFT's order of draws
        A = _kaiming_bf16((config.r, 1, small), generator)
        B = torch.cat([_kaiming_bf16((large, 1, config.r), generator) for _ in range(count)], dim=1)
    return {"randlora_A": (A / A.std()).float(), "randlora_B": (B / B.std()).float()}


class RandLoraLinear(LinearAdapterLayer):
    adapter_dict_names = ("randlora_lambda", "randlora_gamma")

    def __init__(self, base_layer: nn.Module, shared: SharedTensors, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.randlora_lambda = nn.ParameterDict()
        self.randlora_gamma = nn.ParameterDict()
        self.randlora_dropout = nn.ModuleDict()
        self._shared = (shared,)  # a reference, not a submodule: the holder is registered once on the model
        self._saves_projection: dict[str, bool] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self._saves_projection.pop(name, None)
        if name in self.randlora_dropout:
            del self.randlora_dropout[name]

    def add(self, name: str, config: RandLoraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        small, large = min(in_features, out_features), max(in_features, out_features)
        count = _ceil_div(small, config.r)
        lam = torch.randn(config.r, count)
        gamma = torch.full((count, small), 1.0 / large)
        if config.init_weights:  # λ = 0: the adapter starts as a no-op
            lam.zero_()
            gamma.fill_(1.0 / max(count, small))
        self.randlora_lambda[name] = nn.Parameter(lam)
        self.randlora_gamma[name] = nn.Parameter(gamma)
        self.randlora_dropout[name] = nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 \
            else nn.Identity()
        self.scaling[name] = config.randlora_alpha / config.r
        self._saves_projection[name] = config.save_projection
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {"randlora_lambda": self.randlora_lambda[name], "randlora_gamma": self.randlora_gamma[name]}
        if self._saves_projection[name]:  # PEFT writes the whole shared bases into every layer too
            out["randlora_A"] = self._shared[0].get("randlora_A", name)
            out["randlora_B"] = self._shared[0].get("randlora_B", name)
        return out

    def factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, P) with ``ΔW = scaling · P @ Q``: Q (K, in), P (out, K)."""
        in_features, out_features = self.in_out
        small, large = min(in_features, out_features), max(in_features, out_features)
        lam, gamma = self.randlora_lambda[name], self.randlora_gamma[name]
        count = lam.shape[1]
        A = self._shared[0].get("randlora_A", name)[:, :, :small].to(dtype)
        B = self._shared[0].get("randlora_B", name)[:large, :count, :].to(dtype)
        scaled = (lam.to(dtype)[:, :, None] * A * gamma.to(dtype)[None]).flatten(0, 1)  # (r·n, small)
        bases = B.flatten(1)  # (large, n·r)
        if small == in_features:
            return scaled, bases
        return bases.T, scaled.T

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dtype = self.randlora_lambda[name].dtype
        Q, P = self.factors(name, dtype)
        x = self.randlora_dropout[name](x.to(dtype))
        return result + nn.functional.linear(nn.functional.linear(x, Q), P) * self.scaling[name]

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        Q, P = self.factors(name, torch.float32)
        delta = (P @ Q).detach() * self.scaling[name]
        return self.canonical(self.canonical(weight) + delta.to(weight.device))


class RandLoraMethod(SeededProjectionMethod):
    projection_keys = PROJECTION_KEYS
    bias_only = "randlora_only"
    method_name = "RandLoRA"

    def __init__(self) -> None:
        super().__init__(RandLoraLinear)

    def make_shared(self, config: RandLoraConfig, in_max: int, out_max: int) -> dict[str, torch.Tensor]:
        return randlora_bases(config, in_max, out_max)


register_method("RANDLORA", RandLoraMethod())
