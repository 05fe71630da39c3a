"""The dtype a fused op runs in, and casting its operands to it, as the composed ops would under
autocast (each fused op then runs with autocast off, on operands already in that dtype)."""

from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when autocast is on for ``tensor``'s device, else ``tensor``'s dtype."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def cast_all(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """``tensors`` in ``dtype`` (None stays None; a tensor already in it is not copied). The casts
    are autograd ops, so gradients reach the tensors' own dtypes."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]
