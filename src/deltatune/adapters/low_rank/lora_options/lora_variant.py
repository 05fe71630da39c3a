"""The hook through which LoRA variants (aLoRA, QA-LoRA, ...) change one adapter of a layer.

A ``LoraLayer`` keeps ``variants[name]`` for adapters whose update is not the plain
``scale · B A x``; the layer's forward, fused path and merge ask the variant instead of
branching on each variant's config field. Variants are attached by ``LoraMethod`` after the
layers are made (``attach_variants``), so each variant's code stays in its own module.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class LoraVariant:
    """One adapter's variant on one layer; the defaults change nothing."""

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` with adapter ``name``'s update for input ``x`` added."""
        raise NotImplementedError

    def merge_problem(self, layer: nn.Module, name: str) -> Optional[str]:
        """Why adapter ``name`` cannot be folded into the base weight, or None."""
        return None

    def delta_weight(self, layer: nn.Module, name: str) -> Optional[torch.Tensor]:
        """The update as a weight (float32, (out, in) layout) where it differs from ``scale · B A``."""
        return None

    def file_tensors(self, layer: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Sub-key -> tensor the variant adds to the adapter's file (KaSA's ``lora_diag``)."""
        return {}
