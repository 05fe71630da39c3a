"""SHiRA layers: a sparse, high-rank update that trains a fixed subset of the weight's entries.

Each layer trains ``r·(in + out)`` entries (LoRA's parameter count at rank r, but no rank limit).
Which entries is a mask: with ``mask_type="random"`` the first ``r·(in + out)`` positions of a
random permutation of the (out, in) positions, drawn on a CPU generator seeded with
``random_seed`` (an unseeded generator starts from torch's fixed default seed), the draw PEFT
makes. The positions are kept in row-major order as a (2, n) int32 tensor of (row, column)
pairs, ``shira_indices``, which the file stores beside the values (``shira_weight``): a file
made with another mask loads as well.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...config import AdapterConfig, ShiraConfig
from ..linear_base import WeightDeltaLayer
from ..method import FILE_PREFIX, LayerMethod, register_method
from ..shared import UnsavedBuffers


def random_positions(out_features: int, in_features: int, count: int, seed: Optional[int]) -> torch.Tensor:
    """(2, count) int32 (row, column) pairs of a random mask, in row-major order."""
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:count].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


class ShiraLinear(WeightDeltaLayer):
    """SHiRA around a linear-like layer; ``ΔW`` is scattered densely from the trained entries."""

    adapter_dict_names = ("shira_weight",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = UnsavedBuffers()

    def _forget(self, name: str) -> None:
        super()._forget(name)
        if name in self.shira_indices:
            del self.shira_indices[name]

    def add(self, name: str, config: ShiraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        count = config.r * (in_features + out_features)
        if count > in_features * out_features:
            raise ValueError(f"ShiraConfig.r = {config.r} would train {count} entries, more than the "
                             f"{out_features}x{in_features} weight of {key!r} holds; choose a smaller r")
        if config.mask_type == "random":
            positions = random_positions(out_features, in_features, count, config.random_seed)
        elif from_file:  # a mask of another kind: the file's shira_indices fill this in
            positions = torch.zeros(2, count, dtype=torch.int32)
        else:
            raise ValueError(f"ShiraConfig.mask_type {config.mask_type!r}: deltatune draws only 'random' masks "
                             "(a file made with another mask loads, as its positions are stored in it)")
        self.scaling[name] = 1.0
        values = torch.zeros(count) if config.init_weights or from_file else torch.randn(count)
        self.shira_weight[name] = nn.Parameter(values)
        self.match_device(name)
        self.shira_indices[name] = positions.to(self.shira_weight[name].device)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"shira_weight": self.shira_weight[name], "shira_indices": self.shira_indices[name]}

    def delta_weight(self, name: str) -> torch.Tensor:
        values = self.shira_weight[name]
        in_features, out_features = self.in_out
        rows, cols = self.shira_indices[name].to(values.device, torch.long)
        dense = torch.zeros(out_features, in_features, device=values.device, dtype=values.dtype)
        return dense.index_put((rows, cols), values * self.scaling[name])


class ShiraMethod(LayerMethod):
    """SHiRA's method: PEFT's SHiRA has no ``bias`` option, so no base bias is trained."""

    def __init__(self) -> None:
        super().__init__(ShiraLinear)

    def prepare_load(self, model: nn.Module, name: str, config: AdapterConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """Positions in a file must lie inside their layer's weight (they index it on every forward)."""
        for key, layer in model.named_modules():
            file_key = f"{FILE_PREFIX}{key}.shira_indices"
            if not isinstance(layer, ShiraLinear) or not layer.has_adapter(name) or file_key not in tensors:
                continue
            positions = tensors[file_key]
            if positions.is_floating_point():  # PEFT on Windows stores them as float32
                tensors[file_key] = positions = positions.to(torch.int32)
            in_features, out_features = layer.in_out
            if positions.ndim == 2 and positions.shape[0] == 2 and positions.numel() and (
                    positions.min() < 0 or positions[0].max() >= out_features or positions[1].max() >= in_features):
                raise ValueError(f"{file_key}: positions outside the {out_features}x{in_features} weight")


register_method("SHIRA", ShiraMethod())
