"""The dtype a fused op runs in, and casting its operands to it, as the composed ops would under
autocast (each fused op then runs with autocast off, on operands already in that dtype).

Under autocast a frozen float32 base weight is cast to bf16 again by every forward pass, since
autocast keeps casts only of tensors that take gradients, and only within one forward. On a CPU
those copies take about a tenth of a bf16 LoRA step on the default model. ``FrozenCasts``
keeps each frozen parameter's cast for as long as a training run lasts: the same values (a
cast is a pure function of the tensor), made once instead of at every forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

_active: Optional["FrozenCasts"] = None  # the FrozenCasts that cast_all uses, inside FrozenCasts.active()


class FrozenCasts:
    """Casts of frozen parameters (``nn.Parameter`` with ``requires_grad=False``, floating point,
    at least ``MIN_ELEMENTS``), made once and reused while the parameter is unchanged: the same
    version counter (in-place updates under ``no_grad`` bump it) and the same storage.

    They cost the frozen weights' size in the compute dtype for as long as this object lives.
    A training forward pass keeps those casts for backward anyway, so a training step's peak
    stays where it was; gradient checkpointing does not keep them, so the loop does not use
    this object with checkpointing (nor with activation offload, FSDP2 or ``torch.compile``).
    Changes made through ``.data`` bypass the version counter: nothing may change a frozen
    weight that way while the object is active (no training step does)."""

    MIN_ELEMENTS = 4096  # smaller tensors (norm weights, biases) cost more to look up than to cast

    def __init__(self) -> None:
        self._kept: WeakIdKeyDictionary = WeakIdKeyDictionary()  # entries go when their parameter does

    def count(self) -> int:
        """How many casts are kept."""
        return len(self._kept)

    def cast(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` in ``dtype``: the kept copy when ``tensor`` has not changed since it was made."""
        stamp = (tensor._version, tensor.data_ptr(), dtype)
        kept = self._kept.get(tensor)
        if kept is None or kept[0] != stamp:
            kept = (stamp, tensor.detach().to(dtype))
            self._kept[tensor] = kept
        return kept[1]

    @staticmethod
    def applies_to(tensor: torch.Tensor) -> bool:
        return (isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad
                and tensor.is_floating_point() and tensor.numel() >= FrozenCasts.MIN_ELEMENTS)

    @contextlib.contextmanager
    def active(self) -> Iterator["FrozenCasts"]:
        """Within: ``cast_all`` takes frozen parameters' casts from this object."""
        global _active
        previous, _active = _active, self
        try:
            yield self
        finally:
            _active = previous


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when autocast is on for ``tensor``'s device, else ``tensor``'s dtype."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def cast_all(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """``tensors`` in ``dtype`` (None stays None; a tensor already in it is not copied). The casts
    are autograd ops, so gradients reach the tensors' own dtypes. Inside ``FrozenCasts.active()``
    a frozen parameter's cast is the kept one."""
    kept = _active
    return [t if t is None or t.dtype == dtype
            else kept.cast(t, dtype) if kept is not None and FrozenCasts.applies_to(t)
            else t.to(dtype) for t in tensors]
