"""HRA layers: the input passes through a chain of ``r`` learned Householder reflections.

Each adapter stores ``hra_u`` (in, r) per layer (PEFT's key and shape). With unit columns
``u_i`` the layer's weight becomes ``W H`` with ``H = H_0 H_1 ⋯ H_{r-1}``, ``H_i = I - 2 u_i u_iᵀ``,
so the input is reflected by ``u_{r-1}`` first and ``u_0`` last: ``2r`` multiply-adds per input
feature, never an (in, in) matrix. ``apply_GS`` orthonormalises the columns first, which makes
``H = I - 2 U Uᵀ``. The default initialisation draws r/2 vectors and repeats each one, so the
reflections cancel in pairs and a new adapter is the identity up to rounding.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ...config import HRAConfig
from ..method import LayerMethod, register_method
from .layer import InputMapLayer
from .maps import gram_schmidt, householder_product


class HRALinear(InputMapLayer):
    """HRA around a linear-like layer."""

    adapter_dict_names = ("hra_u",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.hra_u = nn.ParameterDict()
        self.apply_GS: dict[str, bool] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.apply_GS.pop(name, None)

    def add(self, name: str, config: HRAConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, _ = self.in_out
        if config.r > in_features:  # any orthogonal map of n features is a product of at most n reflections
            raise ValueError(f"HRA at {key!r}: r={config.r} reflections exceed the input width {in_features}; "
                             f"use r <= {in_features}")
        vectors = torch.empty(in_features, config.r)
        if not from_file:
            _initialise(vectors, config.init_weights, key)
        self.hra_u[name] = nn.Parameter(vectors)
        self.apply_GS[name] = config.apply_GS
        self.scaling[name] = 1.0
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"hra_u": self.hra_u[name]}

    def map_input(self, name: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        vectors = self.hra_u[name]
        if self.apply_GS[name]:
            basis = gram_schmidt(vectors)
            return x - 2.0 * (x @ basis) @ basis.T
        return householder_product(x, vectors / vectors.norm(dim=0))


def _initialise(vectors: torch.Tensor, symmetric: bool, key: str) -> None:
    """Kaiming-uniform vectors; ``symmetric`` (init_weights) repeats each of r/2 draws twice, so the
    product of reflections starts at the identity (PEFT's scheme; impossible for an odd r)."""
    r = vectors.shape[1]
    if symmetric and r % 2 == 0:
        half = torch.empty(vectors.shape[0], r // 2)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        vectors.copy_(torch.repeat_interleave(half, 2, dim=1))
        return
    if symmetric:
        warnings.warn(f"HRA: r={r} is odd, so the identity initialisation is impossible at {key!r}; "
                      "the adapter starts as a random reflection chain")
    nn.init.kaiming_uniform_(vectors, a=math.sqrt(5))


register_method("HRA", LayerMethod(HRALinear, bias_only="hra_only"))
