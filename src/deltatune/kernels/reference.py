"""Plain PyTorch reference for every numeric op the adapter layers call.

Fast paths (Triton, later) are tested against these functions, forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def lora_delta(x: torch.Tensor, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float) -> torch.Tensor:
    """``scaling * B(A(x))`` for an already dropped-out input ``x``."""
    return lora_B(lora_A(x)) * scaling


def dora_factor(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor
) -> torch.Tensor:
    """DoRA's per-output scale ``m / ||W + ΔW||_row`` with the norm detached (paper, §4.3).

    ``weight`` and ``delta`` are in (out, in) layout; the result has shape (out,).
    """
    with torch.no_grad():
        norm = torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)
    return magnitude / norm


def linear_no_bias(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with ``W`` in (out, in) layout."""
    return F.linear(x, weight)


def embed(x: torch.Tensor, weight: torch.Tensor, base: nn.Embedding) -> torch.Tensor:
    """Look up ``weight`` (num_embeddings, dim) with the base embedding's options."""
    return F.embedding(
        x,
        weight,
        padding_idx=base.padding_idx,
        max_norm=base.max_norm,
        norm_type=base.norm_type,
        scale_grad_by_freq=base.scale_grad_by_freq,
        sparse=base.sparse,
    )


def embedding_delta(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, base: nn.Embedding
) -> torch.Tensor:
    """LoRA on an embedding: look rows up in ``A.T`` (num_embeddings, r), then project by ``B.T``."""
    return embed(x, lora_A.T, base) @ lora_B.T * scaling


def embed_scale_of(base: nn.Module) -> Optional[torch.Tensor]:
    """Scale some embeddings (Gemma 3) apply inside forward; adapter outputs must get it too."""
    scale = getattr(base, "embed_scale", None)
    return scale if isinstance(scale, torch.Tensor) or isinstance(scale, float) else None
