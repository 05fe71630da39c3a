"""Frozen tensors that many layers share (VeRA's projections, NOLA's random bases).

They are held once, as buffers of one module attached to the model (so ``model.to`` moves
them once), and each layer reaches them through a plain reference, not a submodule.
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator, Optional

import torch
from torch import nn

from ..module_tree import AddedModule
from ..targeting import find_targets
from .base import AdapterContainer
from .linear_base import check_linear_like
from .method import LayerMethod

SHARED_ATTR = "deltatune_shared"


class SharedTensors(AddedModule):
    """Buffers named ``<kind>_<adapter>``, e.g. ``vera_A_default``."""

    stands_for_base = False

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


class TrainedOncePerAdapter(AdapterContainer):
    """What an adapter trains once for all its layers, held at the model level (Uni-LoRA's θ,
    VB-LoRA's vector bank, TinyLoRA's vectors per group): ``getattr(self, attribute)[adapter]`` is
    a parameter, or a ``ParameterDict`` of them. ``attribute`` is the name PEFT gives it."""

    stands_for_base = False
    attribute: ClassVar[str] = ""

    def __init__(self, per_adapter: nn.Module) -> None:
        super().__init__()
        setattr(self, self.attribute, per_adapter)  # an nn.ParameterDict or nn.ModuleDict
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_plan = None

    @property
    def _held(self) -> nn.Module:
        return getattr(self, self.attribute)

    @property
    def adapter_names(self) -> list[str]:
        return list(self._held.keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self._held:
            entry = self._held[name]
            yield from entry.values() if isinstance(entry, nn.ParameterDict) else (entry,)

    def delete_adapter(self, name: str) -> None:
        if name in self._held:
            del self._held[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]


class UnsavedBuffers(nn.Module):
    """Tensors per adapter name, held as buffers (they follow ``model.to``) that stay out of the
    model's state dict: the adapter's file carries them, or they are rebuilt."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor, persistent=False)

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def keys(self):
        return self._buffers.keys()


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


def linear_in_out(module: nn.Module, fan_in_fan_out: bool = False) -> tuple[int, int]:
    """(in, out) of a linear-like module, whatever its weight layout."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    rows, cols = module.weight.shape  # Conv1D stores (in, out)
    return (rows, cols) if type(module).__name__ == "Conv1D" else (cols, rows)  # the type decides (stored_transposed)


class SharedTensorMethod(LayerMethod):
    """A layer method whose layers share frozen tensors sized for the largest targeted layer
    (VeRA, NOLA). Subclasses build them in ``make_shared``; layers get the holder as ``shared``."""

    method_name = ""

    def __init__(self, layer_class) -> None:
        super().__init__(layer_class, self._make)
        self._holder: Optional[SharedTensors] = None

    def make_shared(self, config, in_max: int, out_max: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _make(self, module: nn.Module, config, key: str):
        check_linear_like(module, self.method_name)
        return self.layer_class(module, self._holder, getattr(config, "fan_in_fan_out", False))

    def inject(self, model: nn.Module, config, name: str, from_file: bool) -> None:
        sizes = []
        for _, module in find_targets(model, config):
            base = getattr(module, "base_layer", module)
            check_linear_like(base, self.method_name)
            sizes.append(linear_in_out(base, getattr(config, "fan_in_fan_out", False)))
        if not sizes:
            raise ValueError(f"target_modules={config.target_modules!r} matched no linear layer of {type(model).__name__}")
        holder = shared_tensors(model)
        device = next(model.parameters()).device
        in_max, out_max = max(i for i, _ in sizes), max(o for _, o in sizes)
        for kind, tensor in self.make_shared(config, in_max, out_max).items():
            holder.put(kind, name, tensor.to(device))
        self._holder = holder
        try:
            super().inject(model, config, name, from_file)
        finally:
            self._holder = None

    def remove(self, model: nn.Module, name: str) -> None:
        drop_shared(model, name)
