"""Configs of methods that transform what a layer outputs element by element: RoAd.
PEFT's class name, field names, defaults and ``peft_type``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (the inherited fields' hints are resolved here)

from .base import TargetedConfig, check_positive_int, register_config

ROAD_VARIANTS = ("road_1", "road_2", "road_4")


@register_config
@dataclass
class RoadConfig(TargetedConfig):
    """RoAd (2-D rotation adaptation): each targeted layer's output is cut into groups of
    ``group_size`` elements; element ``i`` of a group is paired with element ``i + group_size/2``
    and each pair is rotated by a learned angle and scaled by a learned factor.

    ``variant``: ``road_1`` shares one angle and scale per pair (out/2 of each per layer),
    ``road_2`` has one per element (out of each), ``road_4`` two per element (2·out of each).
    The output size of every targeted layer must be a multiple of ``group_size``.
    ``init_weights``: start at angle 0 and scale 1 (no change); false draws random values.
    """

    peft_type: ClassVar[str] = "ROAD"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's RoAd has no such field
    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True

    def validate(self) -> None:
        if self.variant not in ROAD_VARIANTS:
            raise ValueError(f"RoadConfig.variant must be one of {list(ROAD_VARIANTS)}, got {self.variant!r}")
        check_positive_int("RoadConfig", "group_size", self.group_size)
        if self.group_size % 2:
            raise ValueError(f"RoadConfig.group_size must be even (elements are paired), got {self.group_size}")
