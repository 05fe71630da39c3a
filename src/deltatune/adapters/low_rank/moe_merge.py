"""Merging LoRA into fused expert weights (full precision or 4-bit) and undoing it exactly.

A merge folds ``Σ scale · B A`` into every adapted parameter in float32. The first merge keeps a
CPU copy of each parameter as it was, so ``unmerge`` restores it bit for bit. A 4-bit expert weight
(``quant.experts``) is decoded first; the merged result is then kept in full precision (a plain
parameter in the compute dtype) or, with ``requantize``, stored in 4 bits again with the same
settings (lossy, as merging into any 4-bit base). ``set_aside``/``put_back`` serve
``dt.disable_adapters``: the merged state is put aside as it is (not merged again, which would
round differently) and the originals come back meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from ...quant.blockwise import QuantState, dequantize_4bit, quantize_4bit
from ...quant.experts import install_4bit, install_float, packed_bytes, quantized_parameter
from ..base import _SetAsideMerge


@dataclass
class Packed4bit:
    """A 4-bit parameter as stored: packed bytes, their state and the dtype the module sees."""

    packed: torch.Tensor
    state: QuantState
    compute_dtype: torch.dtype


Snapshot = Union[torch.Tensor, Packed4bit]


def parameter_device(module: nn.Module, name: str) -> torch.device:
    """Where ``module.<name>`` lives (a 4-bit one: where its packed bytes are), without decoding."""
    if quantized_parameter(module, name) is not None:
        return packed_bytes(module, name).device
    return getattr(module, name).device


def snapshot(module: nn.Module, name: str) -> Snapshot:
    """A CPU copy of ``module.<name>`` as stored."""
    found = quantized_parameter(module, name)
    if found is not None:
        return Packed4bit(packed_bytes(module, name).detach().to("cpu", copy=True), found.quant_state.to("cpu"),
                          found.compute_dtype)
    return getattr(module, name).detach().to("cpu", copy=True)


def restore(module: nn.Module, name: str, saved: Snapshot) -> None:
    """Put ``saved`` back as ``module.<name>`` (its storage kind too), on the parameter's device and
    in the dtype the module computes in now (the model may have been cast since the snapshot)."""
    device = parameter_device(module, name)
    found = quantized_parameter(module, name)
    dtype = found.compute_dtype if found is not None else getattr(module, name).dtype
    if isinstance(saved, Packed4bit):
        install_4bit(module, name, saved.packed.to(device), saved.state.to(device), dtype)
    elif found is not None:
        install_float(module, name, saved.to(device, dtype))
    else:
        with torch.no_grad():
            getattr(module, name).data.copy_(saved.to(device))


def merge(layer, names: Sequence[str], requantize: bool = False) -> None:
    """Fold adapters ``names`` of ``layer`` (an ``ExpertLoraLayer``) into its parameters."""
    if layer._set_aside is not None:
        raise RuntimeError("cannot merge inside dt.disable_adapters (the merged adapters are set aside "
                           "until the block ends); merge after the block")
    names = [n for n in names if n in layer.lora_A and n not in layer.merged_adapters]
    if not names:
        return
    module = layer.base_layer
    if layer._original_weight is None:
        layer._original_weight = {p: snapshot(module, p) for p in layer.parameter_names}
    with torch.no_grad():
        for p in layer.parameter_names:
            found = quantized_parameter(module, p)
            current = dequantize_4bit(packed_bytes(module, p), found.quant_state, torch.float32) \
                if found is not None else getattr(module, p).detach().float()
            for name in names:
                current = current + layer.delta_weight(name, p).to(current.device)
            if found is None:
                weight = getattr(module, p)
                weight.data.copy_(current.to(weight.dtype))
            elif requantize:
                s = found.quant_state
                packed, state = quantize_4bit(current.to(s.dtype), s.quant_type, s.blocksize, s.nested is not None)
                install_4bit(module, p, packed, state, found.compute_dtype)
            else:
                install_float(module, p, current.to(found.compute_dtype))
    layer.merge_requantized = layer.merge_requantized or (requantize and any(
        isinstance(s, Packed4bit) for s in layer._original_weight.values()))
    layer.merged_adapters.extend(names)


def unmerge(layer) -> None:
    """Restore every parameter of ``layer`` exactly as it was before its first merge."""
    layer._set_aside = None
    if layer._original_weight is None:
        return
    for p, saved in layer._original_weight.items():
        restore(layer.base_layer, p, saved)
    layer._original_weight = None
    layer.merged_adapters = []
    layer.merge_requantized = False


def set_aside(layer) -> None:
    """Keep the merged parameters aside and restore the originals (``dt.disable_adapters``)."""
    if not layer.merged_adapters or layer._set_aside is not None:
        return
    aside = _SetAsideMerge(list(layer.merged_adapters), layer.merge_requantized)
    aside.weight = {p: snapshot(layer.base_layer, p) for p in layer.parameter_names}
    aside.original_weight = layer._original_weight
    unmerge(layer)
    layer._set_aside = aside


def put_back(layer) -> None:
    """Undo ``set_aside``: the merged parameters return exactly as they were."""
    aside, layer._set_aside = layer._set_aside, None
    if aside is None:
        return
    for p, merged in aside.weight.items():
        restore(layer.base_layer, p, merged)
    layer._original_weight = aside.original_weight
    layer.merged_adapters = list(aside.adapters)
    layer.merge_requantized = aside.requantized
