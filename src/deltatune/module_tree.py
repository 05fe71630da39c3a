"""Where things sit in a model: submodules replaced by name, the output head, and the base
class that marks deltatune's own modules.

It imports nothing else of deltatune, so the lowest layers (``quant``, ``targeting``) and the
adapters can all use it without importing each other.
"""

from __future__ import annotations

from typing import Optional

from torch import nn


class AddedModule(nn.Module):
    """Base of every module deltatune puts into a model; targeting never looks inside one.

    ``stands_for_base`` is True where the module took the place of a base module (adapter
    layers, trainable copies), which stays a target under its own name, and False for modules
    of deltatune's own (soft prompts, shared tensors), which are never targets.
    """

    stands_for_base: bool = True


def replace_module(model: nn.Module, key: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule named ``key`` is."""
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def output_head_name(model: nn.Module) -> Optional[str]:
    """Qualified name of the output head (left out of "all-linear"), if the model has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head or getattr(module, "base_layer", None) is head:
            return name
        if getattr(module, "original_module", None) is head:
            return name
    return None
