"""(IA)³ layers: a learned vector rescales a layer's output (attention projections) or its
input (layers named in ``feedforward_modules``).

Output side: ``y = l ⊙ base(x)`` (the bias is scaled too); input side: ``y = base(l ⊙ x)``.
Several active adapters multiply their vectors. Merging scales the weight's rows (output
side, and the bias) or columns (input side). The vector is stored as PEFT stores it,
``ia3_l`` of shape (out, 1) or (1, in).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...config import IA3Config
from ...config.methods import IA3_TARGETS
from ...targeting import expand_target_modules
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import LayerMethod, register_method


class IA3Linear(LinearAdapterLayer):
    """(IA)³ around a linear-like layer; ``feedforward`` picks the input side."""

    adapter_dict_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, feedforward: bool, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.feedforward = feedforward
        self.ia3_l = nn.ParameterDict()

    def add(self, name: str, config: IA3Config, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        shape = (1, in_features) if self.feedforward else (out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape) if config.init_ia3_weights else torch.randn(shape))
        self.scaling[name] = 1.0
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    def _vector(self, names) -> torch.Tensor | None:
        scale = None
        for name in names:
            if name in self.ia3_l and name not in self.merged_adapters:
                v = self.ia3_l[name].flatten()
                scale = v if scale is None else scale * v
        return scale

    def _row_scales(self, x: torch.Tensor, size: int) -> torch.Tensor | None:
        """Per-row vectors (batch, 1, ..., size) under ``adapter_per_row``."""
        groups = [(n, rows) for n, rows in self.row_plan.groups(x.shape[0], x.device) if n in self.ia3_l]
        if not groups:
            return None
        first = self.ia3_l[groups[0][0]]
        scales = torch.ones(x.shape[0], size, device=x.device, dtype=first.dtype)
        for name, rows in groups:
            scales = scales.index_copy(0, rows, self.ia3_l[name].flatten().expand(len(rows), size))
        return scales.view(x.shape[0], *([1] * (x.dim() - 2)), size)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        size = self.in_out[0] if self.feedforward else self.in_out[1]
        scale = self._row_scales(x, size) if self.row_plan is not None else self._vector(self.active_adapters)
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        l = self.ia3_l[name].detach().float().to(weight.device)  # (out, 1) or (1, in): broadcasts on (out, in)
        return self.canonical(self.canonical(weight) * l)

    def merge_bias_into(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return bias
        return bias * self.ia3_l[name].detach().float().flatten().to(bias.device)


def _is_feedforward(key: str, feedforward) -> bool:
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, key) is not None
    return key in feedforward or any(key.endswith(f".{n}") for n in feedforward)


class IA3Method(LayerMethod):
    def __init__(self) -> None:
        super().__init__(IA3Linear, self._make)

    def prepare(self, model: nn.Module, config) -> None:
        if config.target_modules is None and config.feedforward_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type in IA3_TARGETS:
                config.feedforward_modules = list(IA3_TARGETS[model_type][1])
        config.target_modules = expand_target_modules(model, config)
        if config.feedforward_modules is None:
            config.feedforward_modules = []
        ff, targets = config.feedforward_modules, config.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            # PEFT's rule: each feed-forward name must also be a target name
            missing = sorted(set(ff) - set(targets))
            if not all(any(t.endswith("." + m) or m.endswith("." + t) or m == t for t in targets) for m in missing):
                raise ValueError(f"IA3Config.feedforward_modules {missing} are not in target_modules {targets}")

    @staticmethod
    def _make(module: nn.Module, config: IA3Config, key: str) -> IA3Linear:
        check_linear_like(module, "IA3")
        return IA3Linear(module, _is_feedforward(key, config.feedforward_modules), config.fan_in_fan_out)


register_method("IA3", IA3Method())
