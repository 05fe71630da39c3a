"""Context managers around a forward pass: autocast for the run's precision, and where saved
activations live (``activation_offload``, ``cheap_recompute``)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .config import ConfigError
from .recompute import CheapRecompute


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast on ``device``, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ConfigError(f"precision {precision!r} is not supported; use fp32, bf16 or fp16")
    return torch.autocast(device.type, dtype=dtype)


def saved_activations(offload: bool, device: torch.device, recompute: Optional[CheapRecompute] = None):
    """Where autograd keeps what backward needs: pinned CPU memory with ``offload``; with
    ``recompute``, the tensors it can rebuild are kept as recipes."""
    if offload:
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
    return recompute.saving() if recompute is not None else contextlib.nullcontext()
