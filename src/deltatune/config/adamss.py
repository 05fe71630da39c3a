"""AdaMSS's config, with PEFT's (0.21.2) class name, fields, defaults and ``peft_type``.

AdaMSS (Adaptive Multi-Subspace approach for parameter-efficient fine-tuning,
https://openreview.net/forum?id=8ZdWmpYxT0) splits each targeted weight's top singular space
into clusters of output rows and trains a small low-rank update per cluster; the layers live in
``deltatune.adapters.low_rank.adamss``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (Any: the base fields' hints resolve here)

from .base import TargetedConfig, check_positive_int, register_config


@register_config
@dataclass
class AdamssConfig(TargetedConfig):
    """AdaMSS: per targeted linear layer, ``[W | b]`` (the bias as one more input column) gets a
    rank-``R = min(r, out, in [+1])`` randomised SVD (seeded by ``random_seed``); k-means
    (PEFT's fixed seed) groups the output rows by their left singular vectors into
    ``num_subspaces`` clusters. The frozen ``Vᵀ`` (R, in [+1]) projects the input, and each cluster
    ``k`` trains ``A_k`` (r_k, R) and ``B_k`` (rows_k, r_k), ``r_k = min(rows_k, subspace_rank)``
    (or, with ``use_dynamic_rank``, the count of the cluster's Gram singular values above
    ``svd_threshold`` × the largest, at most ``subspace_rank``): the cluster's outputs gain
    ``B_k A_k Vᵀ [x; 1]``. ``init_weights="orthogonal"``: ``A_k`` starts from an orthonormal
    basis of the cluster's singular coordinates and ``B_k`` at zero (a no-op); ``None`` (or
    false): ``B_k`` small random values. ``use_asa`` (Adaptive Subspace Allocation): during
    training, from step ``init_warmup`` to ``final_warmup`` gradient importance scores are
    averaged (``asa_importance_beta``, ``asa_uncertainty_beta``) and every ``mask_interval``
    steps the globally least important subspaces are frozen, on a schedule (exponent
    ``asa_schedule_exponent``) that ends at ``asa_target_subspaces`` trained subspaces.
    Files carry the factors and ``Vᵀ``; the clustering is recomputed from the base weight."""

    peft_type: ClassVar[str] = "ADAMSS"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's AdaMSS has no such field
    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    init_weights: Optional[str] = "orthogonal"
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = 0

    def validate(self) -> None:
        owner = "AdamssConfig"
        if self.init_weights is False:  # PEFT reads false as None
            self.init_weights = None
        for name in ("r", "num_subspaces", "subspace_rank"):
            check_positive_int(owner, name, getattr(self, name))
        if self.init_weights not in ("orthogonal", None):
            raise ValueError(f"{owner}.init_weights must be 'orthogonal' or None, got {self.init_weights!r}")
        for name in ("use_asa", "use_dynamic_rank"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("init_warmup", "final_warmup", "asa_target_subspaces", "mask_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{owner}.{name} must be an integer, got {value!r}")
        for name in ("asa_importance_beta", "asa_uncertainty_beta"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{owner}.{name} must be in [0, 1] (an average's weight on the past), got {value!r}")
        if not _is_number(self.asa_schedule_exponent):
            raise ValueError(f"{owner}.asa_schedule_exponent must be a number, got {self.asa_schedule_exponent!r}")
        if not _is_number(self.svd_threshold) or self.svd_threshold < 0:
            raise ValueError(f"{owner}.svd_threshold must be a non-negative number, got {self.svd_threshold!r}")
        if not isinstance(self.random_seed, int) or isinstance(self.random_seed, bool) \
                or not -2 ** 63 <= self.random_seed < 2 ** 64:  # torch.manual_seed's range
            raise ValueError(f"{owner}.random_seed must be an integer seed, got {self.random_seed!r}")
        if self.use_asa:  # PEFT's rules, checked only with ASA on (as PEFT does)
            if self.mask_interval <= 0:
                raise ValueError(f"{owner}.mask_interval must be a positive integer when use_asa is on, "
                                 f"got {self.mask_interval}")
            if self.init_warmup >= self.final_warmup:
                raise ValueError(f"{owner}.init_warmup ({self.init_warmup}) must be smaller than final_warmup "
                                 f"({self.final_warmup}) when use_asa is on (the pruning ramp runs between them)")
            if self.asa_target_subspaces <= 0:
                raise ValueError(f"{owner}.asa_target_subspaces must be a positive integer when use_asa is on, "
                                 f"got {self.asa_target_subspaces}")
            if self.asa_schedule_exponent <= 0:
                raise ValueError(f"{owner}.asa_schedule_exponent must be positive when use_asa is on, "
                                 f"got {self.asa_schedule_exponent}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(f"{owner}.layers_to_transform/layers_pattern cannot be used when target_modules is a "
                             "regular expression (PEFT's rule); put the layers into the expression")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{owner}.layers_pattern is only meaningful together with layers_to_transform")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
