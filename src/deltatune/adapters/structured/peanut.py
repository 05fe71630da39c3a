"""PEANuT layers: the update is a small network applied to the frozen weight, ``ΔW = f(W)``.

Per adapter, ``peanut_A`` (r, out), ``depth`` encoder and decoder matrices (r, r) and
``peanut_B`` (out, r). The rows of ``Wᵀ`` (in, out) go through ``A``, the encoders, the decoders
(decoder ``i`` adds back the input of encoder ``depth−1−i``) and ``B``, with ``act_fn`` after
``A`` and after every encoder and decoder; times ``scaling`` that is ``ΔWᵀ``. The file keys are
PEFT's: ``peanut_A.weight``, ``peanut_B.weight``, ``peanut_encoders.<i>.weight``,
``peanut_decoders.<i>.weight``. ``ΔW`` is a full-size matrix formed every forward from the
base weight (dequantized for a 4-bit base); merging uses the unmerged weight.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from transformers.activations import ACT2FN

from ...config import PeanutConfig
from ...quant.layers import QuantLinear
from ..linear_base import WeightDeltaLayer
from ..method import LayerMethod, register_method


def _kaiming(shape: tuple[int, int]) -> torch.Tensor:
    """nn.Linear's default draw for a weight of ``shape`` (as PEFT initialises PEANuT)."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))


class PeanutLinear(WeightDeltaLayer):
    adapter_dict_names = ("peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.peanut_A = nn.ParameterDict()
        self.peanut_B = nn.ParameterDict()
        self.peanut_encoders = nn.ModuleDict()  # name -> ParameterList of depth (r, r) matrices
        self.peanut_decoders = nn.ModuleDict()
        self.act_fn: dict[str, str] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.act_fn.pop(name, None)

    def add(self, name: str, config: PeanutConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        _, out_features = self.in_out
        r = config.r
        self.peanut_A[name] = nn.Parameter(_kaiming((r, out_features)))
        self.peanut_encoders[name] = nn.ParameterList([nn.Parameter(_kaiming((r, r))) for _ in range(config.depth)])
        self.peanut_decoders[name] = nn.ParameterList([nn.Parameter(_kaiming((r, r))) for _ in range(config.depth)])
        B = torch.zeros(out_features, r) if config.init_weights else _kaiming((out_features, r))
        self.peanut_B[name] = nn.Parameter(B)
        self.act_fn[name] = config.act_fn
        self.scaling[name] = config.scaling
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {"peanut_A.weight": self.peanut_A[name], "peanut_B.weight": self.peanut_B[name]}
        for kind in ("peanut_encoders", "peanut_decoders"):
            for i, weight in enumerate(getattr(self, kind)[name]):
                out[f"{kind}.{i}.weight"] = weight
        return out

    def delta_weight(self, name: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``ΔW`` (out, in) in the adapter's dtype, from ``weight`` (stored layout; default: the base weight)."""
        A = self.peanut_A[name]
        weight = self.base_weight() if weight is None else weight
        act = ACT2FN[self.act_fn[name]]
        h = act(self.canonical(weight.detach()).T.to(A.dtype) @ A.T)  # (in, r)
        inputs = []
        for encoder in self.peanut_encoders[name]:
            inputs.append(h)
            h = act(h @ encoder.T)
        for decoder, skip in zip(self.peanut_decoders[name], reversed(inputs)):
            h = act(h @ decoder.T) + skip
        return (h @ self.peanut_B[name].T * self.scaling[name]).T

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        # ΔW of the unmerged weight (the one forward reads), as PEFT merges
        delta = self.delta_weight(name, original).float().to(weight.device)
        return self.canonical(self.canonical(weight) + delta)


class PeanutMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(PeanutLinear, self._make)

    @staticmethod
    def _make(module: nn.Module, config: PeanutConfig, key: str) -> PeanutLinear:
        if not isinstance(module, (nn.Linear, QuantLinear)):
            raise TypeError(f"PEANuT cannot wrap a {type(module).__name__}; as in PEFT, only nn.Linear layers "
                            "(and deltatune's quantized linears) are supported")
        return PeanutLinear(module)


register_method("PEANUT", PeanutMethod())
