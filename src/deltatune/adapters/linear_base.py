"""Shared parts of adapter layers around linear-like base layers (``nn.Linear``, GPT-2's
``Conv1D``, deltatune's quantized linears): layout, sizes, dtype/device of new tensors."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..quant.layers import QuantLinear
from .base import AdapterLayer


def check_linear_like(module: nn.Module, method: str) -> None:
    if not (isinstance(module, (nn.Linear, QuantLinear)) or type(module).__name__ == "Conv1D"):
        raise TypeError(
            f"{method} cannot wrap a {type(module).__name__}; supported base layers are nn.Linear, "
            "GPT-2 Conv1D and deltatune's quantized linear layers"
        )


def check_plain_linear(module: nn.Module, method: str, why: str) -> None:
    """Refuse anything but ``nn.Linear`` and deltatune's quantized linears (GPT-2's Conv1D included),
    for methods PEFT applies to ``nn.Linear`` only; ``why`` says what PEFT does instead."""
    if not isinstance(module, (nn.Linear, QuantLinear)):
        raise TypeError(f"{method} cannot wrap a {type(module).__name__}; supported base layers are nn.Linear and "
                        f"deltatune's quantized linear layers ({why})")


def stored_transposed(base_layer: nn.Module, fan_in_fan_out: bool) -> bool:
    """Whether ``base_layer`` stores its weight as (in, out): GPT-2's ``Conv1D`` does, ``nn.Linear``
    and deltatune's quantized linears never do. The layer's type decides, as in PEFT, which
    overrides a config's ``fan_in_fan_out`` per layer; a flag that contradicts the type is
    ignored with a warning instead of silently reading the weight the wrong way round."""
    is_conv1d = type(base_layer).__name__ == "Conv1D"
    if fan_in_fan_out and not is_conv1d and isinstance(base_layer, nn.Linear):
        warnings.warn("fan_in_fan_out=True, but the targeted layer is an nn.Linear, whose weight is (out, in); "
                      "treating it as fan_in_fan_out=False, as PEFT does", stacklevel=3)
    return is_conv1d and not isinstance(base_layer, QuantLinear)


class LinearAdapterLayer(AdapterLayer):
    """An adapter layer whose base is linear-like; ``transposed``: the weight is stored (in, out)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.transposed = stored_transposed(base_layer, fan_in_fan_out)
        self.scaling: dict[str, float] = {}

    def has_adapter(self, name: str) -> bool:
        return name in self.scaling  # set by add, cleared by delete

    def _forget(self, name: str) -> None:
        self.scaling.pop(name, None)

    def canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """Stored layout <-> (out, in) layout (an involution: transposes when stored is (in, out))."""
        return weight.T if self.transposed else weight

    @property
    def in_out(self) -> tuple[int, int]:
        if self.quantized:
            return self.base_layer.in_features, self.base_layer.out_features
        out_features, in_features = self.canonical(self.base_weight()).shape
        return in_features, out_features

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight in its stored layout as it was before any merge (dequantized for a
        quantized base): what methods that read the frozen weight (HiRA, Super-Tuning) use."""
        if self._original_quant is not None:
            return self._original_quant[0].dequantize()
        if self._original_weight is not None:
            return self._original_weight.to(self.base_weight().device)
        return self.base_weight()

    def match_device(self, name: str) -> None:
        """Move adapter ``name``'s tensors to the base weight's device and (floating) dtype."""
        weight = self.base_weight()
        if weight.is_meta:  # a base built on meta to be loaded into shards: the adapter keeps its values
            return
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        for p in self.adapter_parameters(name):
            p.data = p.data.to(weight.device, dtype)


class WeightDeltaLayer(LinearAdapterLayer):
    """Methods whose update is a full weight ``ΔW`` built from small factors (LoHa, LoKr):
    forward adds ``x @ ΔWᵀ``; merging adds ``ΔW`` to the weight."""

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` in (out, in) layout, in the adapter's dtype, with the scale applied."""
        raise NotImplementedError

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        delta = self.training_delta(name)
        return result + nn.functional.linear(x.to(delta.dtype), delta)

    def training_delta(self, name: str) -> torch.Tensor:
        """``ΔW`` as the forward pass uses it (subclasses add rank/module dropout)."""
        return self.delta_weight(name)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name).to(weight.device, torch.float32)
        return self.canonical(self.canonical(weight) + delta)
