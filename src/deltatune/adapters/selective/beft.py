"""BEFT layers (arXiv:2509.15974): a learned vector added to a linear layer's output.

``y = base(x) + b``, one ``beft_bias`` of shape (1, out) per adapter, zero at the start (PEFT's
layout and initialisation: a standard-normal draw, then zeros unless ``init_weights=False``, so
seeded runs draw what PEFT draws). Several active adapters add their vectors. Merging adds the
vector to the layer's bias, exactly reversible by ``unmerge``; a layer without a bias cannot be
merged into (PEFT refuses too). Each row's output depends on that row only, so rows route per
adapter. PEFT wraps ``nn.Linear`` only; deltatune also wraps GPT-2's ``Conv1D`` and its quantized
linears (the vector does not touch the weight), whose files PEFT then cannot load.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...config.beft import BeftConfig
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import LayerMethod, register_method


class BeftLinear(LinearAdapterLayer):
    """A linear-like layer with learned output biases."""

    adapter_dict_names = ("beft_bias",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.beft_bias = nn.ParameterDict()

    def add(self, name: str, config: BeftConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on {key}")
        _, out_features = self.in_out
        vector = torch.randn(1, out_features)  # drawn even when zeroed, as PEFT draws it
        if config.init_weights:
            vector.zero_()
        self.beft_bias[name] = nn.Parameter(vector)
        self.scaling[name] = 1.0
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"beft_bias": self.beft_bias[name]}

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self.beft_bias[name].flatten().to(result.dtype)

    def merge_problem(self, name: str) -> Optional[str]:
        if self.bias is None:
            return "the base layer has no bias to add the BEFT vector to"
        return None

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return weight  # the weight does not change; only the bias does

    def merge_bias_into(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.beft_bias[name].detach().flatten().to(bias.device, torch.float32)


def _make(module: nn.Module, config: BeftConfig, key: str) -> BeftLinear:
    check_linear_like(module, "BEFT")
    return BeftLinear(module)


register_method("BEFT", LayerMethod(BeftLinear, _make))
