"""Frozen tensors that many layers share (VeRA's projections, NOLA's random bases).

They are held once, as buffers of one module attached to the model (so ``model.to`` moves
them once), and each layer reaches them through a plain reference, not a submodule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

SHARED_ATTR = "deltatune_shared"


class SharedTensors(nn.Module):
    """Buffers named ``<kind>_<adapter>``, e.g. ``vera_A_default``."""

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[str, str] = {}  # buffer name -> adapter

    def get(self, kind: str, adapter: str) -> torch.Tensor:
        return getattr(self, f"{kind}_{adapter}")

    def put(self, kind: str, adapter: str, tensor: torch.Tensor) -> None:
        self.register_buffer(f"{kind}_{adapter}", tensor)
        self.owners[f"{kind}_{adapter}"] = adapter

    def drop(self, adapter: str) -> None:
        for key in [k for k, owner in self.owners.items() if owner == adapter]:
            del self._buffers[key]
            del self.owners[key]


def shared_tensors(model: nn.Module, create: bool = True) -> Optional[SharedTensors]:
    holder = getattr(model, SHARED_ATTR, None)
    if holder is None and create:
        holder = SharedTensors()
        setattr(model, SHARED_ATTR, holder)
    return holder


def drop_shared(model: nn.Module, adapter: str) -> None:
    """Forget adapter's shared tensors; the holder goes when it is empty."""
    holder = shared_tensors(model, create=False)
    if holder is None:
        return
    holder.drop(adapter)
    if not holder._buffers:
        delattr(model, SHARED_ATTR)


def seeded_kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform(±√3·√2/√fan_in) with fan_in = shape[1]·(rest): Kaiming's ReLU gain, drawn from a
    CPU generator so every machine rebuilds the same values from the seed (PEFT's VeRA rule)."""
    fan_in = shape[1] * math.prod(shape[2:]) if len(shape) > 1 else shape[0]
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def largest_in_out(layers_in_out: list[tuple[int, int]]) -> tuple[int, int]:
    """The largest input and output sizes among the targeted layers."""
    return max(i for i, _ in layers_in_out), max(o for _, o in layers_in_out)
