"""Configs of methods whose update is computed from the frozen weight itself: DEFT and PEANuT.
PEFT's class names, field names, defaults and ``peft_type`` strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (the fields' hints are resolved here)

from .base import TargetedConfig, check_positive_int, check_probability, register_config


def _check_layers(owner: str, config: TargetedConfig) -> None:
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{owner}.layers_pattern needs layers_to_transform")
    if isinstance(config.target_modules, str) and config.target_modules != "all-linear" and \
            (config.layers_to_transform is not None or config.layers_pattern is not None):
        raise ValueError(f"{owner}.layers_to_transform/layers_pattern cannot be combined with a regular expression "
                         "in target_modules")


@register_config
@dataclass
class DeftConfig(TargetedConfig):
    """DEFT (decompositional efficient fine-tuning): replace an r-dimensional part of each weight.

    Per layer, ``P`` (out, r) and ``R`` (r, in) are learned and the weight becomes
    ``W' = (I − P_proj)·W + Q_P·s·R``. ``decomposition_method``: ``"relu"`` takes ``Q_P = P`` and
    ``P_proj = P·relu(P)ᵀ``; ``"qr"`` takes ``Q_P`` from a QR decomposition of ``P`` and
    ``P_proj = Q_P·Q_Pᵀ``. ``s = alpha / r`` when ``alpha`` is set, else 1. ``para``: removal
    only (``W' = (I − P_proj)·W``, no ``R``; the PaRa method), never a no-op. ``init_weights``:
    ``R`` starts as ``relu(P)ᵀ·W / s`` (or ``Q_Pᵀ·W / s``), so the adapter starts as a no-op;
    otherwise ``R`` is normal with std ``0.02·init_scale``. ``r`` is capped at each layer's output
    size. ``deft_dropout`` applies to the input of the injected part only.
    """

    peft_type: ClassVar[str] = "DEFT"
    r: int = 8
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: Optional[int] = None
    para: bool = False
    fan_in_fan_out: bool = False
    deft_dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    bias: str = "none"

    def validate(self) -> None:
        check_positive_int("DeftConfig", "r", self.r)
        if self.decomposition_method not in ("relu", "qr"):
            raise ValueError(f"DeftConfig.decomposition_method must be 'relu' or 'qr', got {self.decomposition_method!r}")
        check_probability("DeftConfig", "deft_dropout", self.deft_dropout)
        if self.bias not in ("none", "all", "deft_only"):
            raise ValueError(f"DeftConfig.bias must be 'none', 'all' or 'deft_only', got {self.bias!r}")
        _check_layers("DeftConfig", self)


@register_config
@dataclass
class PeanutConfig(TargetedConfig):
    """PEANuT: the update is a small network applied to the frozen weight, ``ΔW = f(W)``.

    Each column of ``Wᵀ`` (one per input feature, of the output size) goes through ``A``
    (out → r), ``depth`` encoder layers and ``depth`` decoder layers (r → r, each decoder adding
    back the matching encoder's input), then ``B`` (r → out); ``act_fn`` (a name in
    transformers' ``ACT2FN``) follows ``A`` and every encoder and decoder. The result times
    ``scaling`` is ``ΔWᵀ``. ``init_weights``: ``B`` starts at zero (no change); otherwise random.
    PEFT applies PEANuT to ``nn.Linear`` layers only (not GPT-2's Conv1D); so does deltatune.
    """

    peft_type: ClassVar[str] = "PEANUT"
    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    def validate(self) -> None:
        from transformers.activations import ACT2FN  # the activation names PEFT accepts

        check_positive_int("PeanutConfig", "r", self.r)
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise ValueError(f"PeanutConfig.depth must be a non-negative integer, got {self.depth!r}")
        if self.act_fn not in ACT2FN:
            raise ValueError(f"PeanutConfig.act_fn {self.act_fn!r} is not an activation of transformers' ACT2FN; "
                             f"known: {sorted(ACT2FN)}")
        _check_layers("PeanutConfig", self)
