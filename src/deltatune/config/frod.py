"""FRoD's config, with PEFT's (0.21.2) class name, fields, defaults and ``peft_type``.

FRoD (Full-Rank efficient fine-tuning with Rotational Degrees, https://doi.org/10.1609/aaai.v40i31.39813)
rebuilds each targeted weight as ``U (S + diag(λ)) Vᵀ``; the layers live in
``deltatune.adapters.orthogonal.frod``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (Any: the base fields' hints resolve here)

from .base import TargetedConfig, check_probability, register_config


@register_config
@dataclass
class FrodConfig(TargetedConfig):
    """FRoD: each targeted linear weight ``W`` (out, in) is rebuilt as ``U (S + diag(λ)) Vᵀ``.

    ``V`` (in, in) is one basis per module role (``self_attn_q_proj``, ``mlp_down_proj``: the last
    two parts of the module name), computed once from the weights of that role in every layer
    (their joint QR decomposition and the eigenvectors of the averaged, ``regularization_alpha``-
    ridged inverse Gram matrices of the Q slices; an SVD where the stacked weights are wider than
    tall). ``λ`` (in,) and ``U`` (out, in, unit columns) come from ``W = U diag(λ) Vᵀ``; ``U`` is
    frozen and recomputed from the base weight on every load, ``λ`` is trained. ``S`` (in, in) is
    a sparse trained matrix whose positions (off the diagonal, ``sparse_rate`` of all entries,
    shared by the role) are drawn with seed ``projection_prng_key``; it starts at zero, so a new
    adapter rebuilds ``W`` up to rounding. ``save_projection``: files carry ``V`` and ``S``'s
    positions (otherwise both are recomputed from the base and the seed). ``progressbar`` and
    ``runtime_offload_base_weight`` are PEFT's progress display and device placement choices;
    neither changes a value, and deltatune keeps the base weight where the model put it.
    Linear layers and GPT-2's Conv1D (the layer's type decides the layout).
    """

    peft_type: ClassVar[str] = "FROD"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's FRoD has no such field
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    def validate(self) -> None:
        owner = "FrodConfig"
        seed = self.projection_prng_key
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"{owner}.projection_prng_key must be a non-negative integer seed, got {seed!r}")
        for name in ("save_projection", "fan_in_fan_out", "init_weights", "progressbar",
                     "runtime_offload_base_weight"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")
        check_probability(owner, "frod_dropout", self.frod_dropout)
        if self.bias not in ("none", "all", "frod_only"):
            raise ValueError(f"{owner}.bias must be 'none', 'all' or 'frod_only', got {self.bias!r}")
        rate = self.sparse_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"{owner}.sparse_rate must be a number from 0 to 1 (the share of S's entries "
                             f"that train), got {rate!r}")
        alpha = self.regularization_alpha
        # a ridge: it keeps each (QᵢᵀQᵢ + αI) invertible (0 is allowed, as PEFT allows it)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < float("inf"):
            raise ValueError(f"{owner}.regularization_alpha must be a finite number of at least 0, got {alpha!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{owner}.layers_pattern is only meaningful together with layers_to_transform")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != "all-linear":
            raise ValueError(f"{owner}.layers_to_transform cannot be combined with a regular expression in "
                             "target_modules")
