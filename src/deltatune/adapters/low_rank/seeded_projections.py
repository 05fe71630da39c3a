"""What VeRA, PVeRA and RandLoRA share at the model level: frozen random projections drawn from
``projection_prng_key`` once per adapter (``adapters/shared.py`` holds them), written to the file
under ``base_model.<kind>`` when ``save_projection`` is set and rebuilt from the seed when not,
and the base biases that ``bias="all"`` / ``"<method>_only"`` trains beside the adapter."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..shared import SharedTensorMethod, shared_tensors


class SeededProjectionMethod(SharedTensorMethod):
    """A shared-tensor method whose tensors are seeded projections saved under ``projection_keys``."""

    projection_keys: ClassVar[dict[str, str]] = {}  # shared tensor kind -> file key

    def file_tensors(self, model: nn.Module, name: str, config) -> dict[str, torch.Tensor]:
        out = super().file_tensors(model, name, config)
        if config.save_projection:
            holder = shared_tensors(model, create=False)
            for kind, key in self.projection_keys.items():
                out[key] = holder.get(kind, name)
        return out

    def optional_file_keys(self, config) -> set[str]:
        return set(self.projection_keys.values())  # rebuilt from projection_prng_key when not saved

    def prepare_load(self, model: nn.Module, name: str, config, tensors: dict[str, torch.Tensor]) -> None:
        """Projections in the file win over the seeded ones (they are what the adapter was trained with)."""
        holder = shared_tensors(model, create=False)
        for kind, key in self.projection_keys.items():
            if key in tensors:
                current = holder.get(kind, name)
                if tuple(tensors[key].shape) != tuple(current.shape):
                    raise ValueError(f"{key} has shape {tuple(tensors[key].shape)} in the file but this model's "
                                     f"targeted layers need {tuple(current.shape)}")
                holder.put(kind, name, tensors[key].to(current.device, current.dtype))
