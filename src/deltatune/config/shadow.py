"""The config of ShadowPEFT (PEFT 0.21.2's ``ShadowConfig``, ``peft_type`` ``SHADOW``): PEFT's class
name, fields and defaults. The method itself lives in ``deltatune.adapters.parallel.shadow``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (Any: the base fields' hints resolve here)

from .base import TargetedConfig, check_positive_int, check_probability, register_config

MIRROR = "mirror"


@register_config
@dataclass
class ShadowConfig(TargetedConfig):
    """ShadowPEFT (Li et al. 2026, arXiv:2604.19254): a small trainable *shadow* network runs beside the
    frozen decoder. A shadow backbone (a fresh copy of the base's decoder architecture, one layer
    by default: ``shadow_num_hidden_layers``, with optional smaller ``shadow_hidden_size``,
    ``shadow_num_attention_heads``, ``shadow_intermediate_size``) turns the input embeddings into a
    first shadow state ``s``. At every targeted decoder block the block's input ``h`` becomes
    ``h + shadow_alpha · up(dropout(down(h − s)))`` (rank ``r``; ``up`` starts at zero with
    ``init_weights``, so a new adapter is a no-op), and after the block ``s`` moves towards the
    block's output ``o`` through a gate: ``s ← (1 − g) s + g T(o)``, ``g = σ(G(o))``, with ``T`` and
    ``G`` two-layer GELU MLPs of width ``update_hidden_size`` (default ``r``). In training the
    shadow path also predicts the labels on its own: the frozen output head applied to the first
    shadow state adds ``auxiliary_loss_weight`` × its cross-entropy to the loss.

    ``target_modules`` names whole decoder blocks (``None``: every block; ``layers_to_transform``
    then picks some of them); the blocks must be contiguous. ``share_embeddings``: the backbone
    reads the base's frozen input embeddings instead of its own table. Only ``shadow_model="mirror"``
    is implemented (a pretrained shadow checkpoint is refused by name). It cannot be merged: the
    change depends on the input through the shadow state, not on the weights alone."""

    peft_type: ClassVar[str] = "SHADOW"
    mergeable: ClassVar[bool] = False
    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = MIRROR
    shadow_num_hidden_layers: Optional[int] = None
    shadow_hidden_size: Optional[int] = None
    shadow_num_attention_heads: Optional[int] = None
    shadow_intermediate_size: Optional[int] = None
    share_embeddings: bool = True
    update_hidden_size: Optional[int] = None
    auxiliary_loss_weight: float = 0.05
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        owner = "ShadowConfig"
        check_positive_int(owner, "r", self.r)
        for name in ("shadow_alpha", "auxiliary_loss_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
        if self.auxiliary_loss_weight < 0:
            raise ValueError(f"{owner}.auxiliary_loss_weight must be at least 0 (0 turns the shadow loss off), "
                             f"got {self.auxiliary_loss_weight!r}")
        check_probability(owner, "shadow_dropout", self.shadow_dropout)
        for name in ("init_weights", "share_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                     "shadow_intermediate_size", "update_hidden_size"):
            if getattr(self, name) is not None:
                check_positive_int(owner, name, getattr(self, name))
        if not isinstance(self.shadow_model, str) or not self.shadow_model:
            raise ValueError(f"{owner}.shadow_model must be 'mirror' or a model path, got {self.shadow_model!r}")
        if self.shadow_model != MIRROR:
            overrides = [name for name in ("shadow_num_hidden_layers", "shadow_hidden_size",
                                           "shadow_num_attention_heads", "shadow_intermediate_size")
                         if getattr(self, name) is not None]
            if overrides:  # PEFT's rule: a checkpoint brings its own architecture
                raise ValueError(f"{owner}.shadow_model={self.shadow_model!r} is a checkpoint with its own "
                                 f"architecture; unset the mirror-only field(s) {', '.join(overrides)}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(f"{owner}.layers_to_transform/layers_pattern cannot be used when target_modules is a "
                             "regular expression (PEFT's rule); put the layers into the expression")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{owner}.layers_pattern is only meaningful together with layers_to_transform")
