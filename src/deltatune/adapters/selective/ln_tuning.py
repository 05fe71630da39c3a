"""LN tuning (Zhao et al., 2023, "Tuning LayerNorm in Attention"): each targeted module, by default
the norm layers, gets one trainable copy per adapter that runs in its place.

The copies start equal to the original, so a new adapter changes nothing, and the original is
never written while the adapter is live, so disabling and switching give the base back exactly.
Merging writes the active copy's weight and bias into the original (kept aside on the CPU for an
exact unmerge). Files hold PEFT's keys, ``<module>.ln_tuning_layers.<tensor>``.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ...config import AdapterConfig
from ...quant.layers import QuantLinear
from ..base import AdapterLayer
from ..method import LayerMethod, register_method


class LNTuningLayer(AdapterLayer):
    """A module run as one of its trained copies (the last active adapter's), or as itself."""

    adapter_dict_names = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module):
        if isinstance(base_layer, QuantLinear):
            raise TypeError("LN tuning copies modules to train them in full; a quantized linear layer cannot be "
                            "trained (target the norm layers, or load the base without quantization)")
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()

    def add(self, name: str, config: AdapterConfig, key: str, from_file: bool = False) -> None:
        if name in self.ln_tuning_layers:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.ln_tuning_layers[name] = copy.deepcopy(self.base_layer)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"ln_tuning_layers.{k}": v for k, v in self.ln_tuning_layers[name].state_dict(keep_vars=True).items()}

    def _chosen(self) -> Optional[nn.Module]:
        """The copy that runs now: the last active adapter's that is on this layer and not merged."""
        for name in reversed(self.active_adapters):
            if name in self.ln_tuning_layers and name not in self.merged_adapters:
                return self.ln_tuning_layers[name]
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.row_plan is None:
            return (self._chosen() or self.base_layer)(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name, rows in self.row_plan.groups(x.shape[0], x.device):
            if name in self.ln_tuning_layers:
                routed = self.ln_tuning_layers[name](x.index_select(0, rows), *args, **kwargs).to(result.dtype)
                result = result.index_copy(0, rows, routed) if torch.is_grad_enabled() else \
                    result.index_copy_(0, rows, routed)
        return result

    def merge_problem(self, name: str) -> Optional[str]:
        tensors = {k for k, _ in self.ln_tuning_layers[name].named_parameters()}
        if "weight" not in tensors or not tensors <= {"weight", "bias"}:
            return (f"LN tuning merges modules whose trained tensors are a weight and a bias; this "
                    f"{type(self.base_layer).__name__} trains {sorted(tensors)} (keep it as an adapter)")
        return None

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return self.ln_tuning_layers[name].weight.detach().to(weight.device, torch.float32)

    def merge_bias_into(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        copied = getattr(self.ln_tuning_layers[name], "bias", None)
        return bias if copied is None else copied.detach().to(bias.device, torch.float32)


register_method("LN_TUNING", LayerMethod(LNTuningLayer, lambda module, config, key: LNTuningLayer(module)))
