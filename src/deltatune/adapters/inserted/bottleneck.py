"""Bottleneck adapters (Houlsby, Pfeiffer): a small residual MLP on the output of a sublayer.

The layer wraps a sublayer's output projection (attention ``o_proj``, feed-forward
``down_proj``; see ``BOTTLENECK_TARGETS``) and returns ``h + up(act(down(h)))`` with
``h = base(x)`` (or ``up(act(down(h)))`` with ``residual=False``). The bottleneck width is the
output size divided by ``reduction_factor``; ``up`` starts at zero, so a new adapter changes
nothing. The block is nonlinear in ``h``, so it cannot be folded into the weights.

File format (deltatune's own, same two-file layout as PEFT): ``adapter_config.json`` with
``"peft_type": "BOTTLENECK"`` and the fields of ``BottleneckConfig``;
``adapter_model.safetensors`` with ``base_model.model.<module>.adapter_down.weight`` (width, out),
``...adapter_down.bias``, ``...adapter_up.weight`` (out, width) and ``...adapter_up.bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import BottleneckConfig
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import LayerMethod, register_method

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    def __init__(self, size: int, width: int, activation: str, residual: bool):
        super().__init__()
        self.adapter_down = nn.Linear(size, width)
        self.act = _ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(width, size)
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.adapter_up(self.act(self.adapter_down(h)))
        return h + out if self.residual else out


class BottleneckLayer(LinearAdapterLayer):
    adapter_dict_names = ("bottleneck",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.bottleneck = nn.ModuleDict()

    def add(self, name: str, config: BottleneckConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        _, out_features = self.in_out
        width = max(1, out_features // config.reduction_factor)
        block = Bottleneck(out_features, width, config.non_linearity, config.residual)
        if config.init_weights and not from_file:
            nn.init.zeros_(block.adapter_up.weight)
            nn.init.zeros_(block.adapter_up.bias)
            nn.init.zeros_(block.adapter_down.bias)
        self.bottleneck[name] = block
        self.scaling[name] = 1.0
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.bottleneck[name].named_parameters())

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        block = self.bottleneck[name]
        return block(result.to(block.adapter_down.weight.dtype))

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        raise ValueError("bottleneck adapters cannot be merged into the base weights (their update is nonlinear)")


def _make(module: nn.Module, config: BottleneckConfig, key: str) -> BottleneckLayer:
    check_linear_like(module, "a bottleneck adapter")
    return BottleneckLayer(module)


register_method("BOTTLENECK", LayerMethod(BottleneckLayer, _make))
