"""RoAd layers: the base layer's output is rotated pairwise in 2-D by learned angles and scaled.

The output (size ``out``) is cut into groups of ``g = group_size`` elements; in each group
element ``i`` is paired with element ``i + g/2``. With per-element coefficients ``c`` (cosine
side) and ``s`` (sine side), a pair ``(u, v)`` becomes ``(c_u·u − s_u·v, c_v·v + s_v·u)``, i.e.
``y ↦ c ⊙ y + s ⊙ rot(y)`` where ``rot`` maps each group's halves ``(a, b)`` to ``(−b, a)``.
The coefficients come from the learned ``road_theta`` (angles) and ``road_alpha`` (scales):

- ``road_1``: ``out/2`` of each, one per pair, shared by both elements of the pair;
- ``road_2``: ``out`` of each, ``c = α·cos θ``, ``s = α·sin θ`` per element;
- ``road_4``: ``2·out`` of each; per group the first ``g`` angles/scales give ``c`` and the
  next ``g`` give ``s`` (``c = α₁·cos θ₁``, ``s = α₂·sin θ₂``).

The map is linear in the output, ``R y``, so merging folds it in as ``R W`` and ``R b``:
``R`` applied to each column of the weight. Files hold ``road_theta`` and ``road_alpha``
(1-D) per layer, as PEFT writes them.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config.scaling import RoadConfig
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import LayerMethod, register_method

_SIZE_FACTOR = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output element


def road_coefficients(variant: str, group_size: int, theta: torch.Tensor,
                      alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-output-element (cosine side, sine side) coefficients, each of size ``out``."""
    if variant == "road_1":
        # one value per pair: repeat each half-group so both elements of a pair read it
        theta = theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).reshape(-1)
        alpha = alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).reshape(-1)
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    # road_4: within each group's 2·g values, the first g are the cosine side, the next g the sine side
    theta = theta.reshape(-1, 2, group_size)
    alpha = alpha.reshape(-1, 2, group_size)
    return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)


def road_rotate(y: torch.Tensor, cos_side: torch.Tensor, sin_side: torch.Tensor, group_size: int) -> torch.Tensor:
    """``c ⊙ y + s ⊙ rot(y)`` along the last dimension (see the module docstring)."""
    halves = y.reshape(*y.shape[:-1], -1, 2, group_size // 2)
    rotated = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).reshape(y.shape)
    return y * cos_side + rotated * sin_side


class RoadLinear(LinearAdapterLayer):
    """RoAd around a linear-like layer: ``y = R (W x + b)``."""

    adapter_dict_names = ("road_theta", "road_alpha")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.variant.pop(name, None)
        self.group_size.pop(name, None)

    def add(self, name: str, config: RoadConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        _, out_features = self.in_out
        if out_features % config.group_size:
            raise ValueError(f"RoadConfig.group_size={config.group_size} does not divide the {out_features} outputs "
                             f"of module {key!r}; choose a group_size that divides every targeted layer's outputs")
        size = int(out_features * _SIZE_FACTOR[config.variant])
        theta, alpha = torch.zeros(size), torch.ones(size)
        if not config.init_weights:  # random start, drawn in PEFT's order (angles, then scales)
            theta.normal_(0.0, 0.5)
            alpha.normal_(1.0, 0.5)
        self.road_theta[name] = nn.Parameter(theta)
        self.road_alpha[name] = nn.Parameter(alpha)
        self.variant[name] = config.variant
        self.group_size[name] = config.group_size
        self.scaling[name] = 1.0
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"road_theta": self.road_theta[name], "road_alpha": self.road_alpha[name]}

    def coefficients(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return road_coefficients(self.variant[name], self.group_size[name], self.road_theta[name],
                                 self.road_alpha[name])

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        cos_side, sin_side = self.coefficients(name)
        return road_rotate(result.to(cos_side.dtype), cos_side, sin_side, self.group_size[name])

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        cos_side, sin_side = (c.detach().float().to(weight.device) for c in self.coefficients(name))
        # R W: R acts on the output index, so rotate each column (a row of Wᵀ)
        rotated = road_rotate(self.canonical(weight).T, cos_side, sin_side, self.group_size[name]).T
        return self.canonical(rotated)

    def merge_bias_into(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        cos_side, sin_side = (c.detach().float().to(bias.device) for c in self.coefficients(name))
        return road_rotate(bias, cos_side, sin_side, self.group_size[name])


class RoadMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(RoadLinear, self._make)

    @staticmethod
    def _make(module: nn.Module, config: RoadConfig, key: str) -> RoadLinear:
        check_linear_like(module, "RoAd")
        return RoadLinear(module)


register_method("ROAD", RoadMethod())
