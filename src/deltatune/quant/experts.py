"""4-bit fused expert weights of mixture-of-experts models (NF4/FP4, with double quantization).

transformers 5 keeps a mixture-of-experts layer's experts as fused 3-D parameters (Qwen3-MoE's
``mlp.experts.gate_up_proj`` of shape experts × 2·intermediate × hidden), not as ``nn.Linear``
modules, so quantizing linear layers leaves them, the bulk of the model, in full precision. Here
each such parameter is stored as bitsandbytes stores a quantized parameter
(``bitsandbytes.nn.parametrize.replace_parameter_4bit``): the whole tensor packed in blocks, the
packed bytes held as the parameter and a PyTorch parametrization that decodes them whenever the
module reads the attribute. The module's own forward (and transformers' experts kernels) run
unchanged, its state-dict keys are bitsandbytes' (``…experts.gate_up_proj`` with the packed
bytes, ``…gate_up_proj.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and the
``.quant_state.bitsandbytes__nf4`` record), and PEFT's ``target_parameters`` adapts such a
parameter as it adapts bitsandbytes' own.

Quantization is per expert: a block never spans two experts (each expert's in × out values must be
a multiple of the block size, which every real model shape is), so each block scale belongs to one
expert and the bytes of expert ``e`` are a contiguous slice.

While the module runs, a decoded weight is computed once and kept for the call (switched on by a
forward pre-hook, dropped by an always-called forward hook), not once per access (transformers'
eager experts loop reads the weight once per expert). LoRA on 4-bit
experts (``adapters/low_rank/moe_experts.py``) decodes in its own grouped matmul instead, which
keeps no decoded weight for backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..targeting_experts import PARAMETER_ORDER, expert_parameters, own_parameters, parameter_shape
from .blockwise import QuantState, dequantize_4bit, quantize_4bit
from .layers import bnb_4bit_tensors, state_from_tensors


class Dequantize4bit(nn.Module):
    """The parametrization of a 4-bit parameter: packed bytes in, the decoded tensor out.

    ``shape`` is the decoded shape (targeting reads it without decoding); ``compute_dtype`` the
    dtype the module sees, which follows a floating-point ``model.to(dtype)``."""

    def __init__(self, state: QuantState, compute_dtype: torch.dtype):
        super().__init__()
        self.quant_state = state
        self.compute_dtype = compute_dtype
        self.shape = torch.Size(state.shape)
        self.caching = False  # set while the owning module runs: decode once per call
        self.decoded: Optional[torch.Tensor] = None

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        if self.decoded is not None and self.caching and self.decoded.dtype == self.compute_dtype:
            return self.decoded
        with torch.no_grad():
            decoded = dequantize_4bit(packed, self.quant_state, self.compute_dtype)
        if self.caching:
            self.decoded = decoded
        return decoded

    def _apply(self, fn, recurse: bool = True):
        # The packed bytes (the parameter) move with the model; the scales live here, outside the
        # parameters, so they follow by hand; a float cast changes the dtype the module sees.
        super()._apply(fn, recurse)
        device = self.quant_state.code.device
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=device))
        if probe.device != device:
            self.quant_state = self.quant_state.to(probe.device)
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        s = self.quant_state
        return (f"shape={tuple(self.shape)}, quant={s.quant_type}, blocksize={s.blocksize}, "
                f"double_quant={s.nested is not None}, compute_dtype={self.compute_dtype}")


def quantized_parameter(module: nn.Module, name: str) -> Optional[Dequantize4bit]:
    """The 4-bit parametrization of ``module.<name>``, or None when it is a plain tensor."""
    if not parametrize.is_parametrized(module, name):
        return None
    found = [p for p in module.parametrizations[name] if isinstance(p, Dequantize4bit)]
    return found[0] if found else None


def packed_bytes(module: nn.Module, name: str) -> torch.Tensor:
    """The packed bytes of a 4-bit parameter (what its parametrization decodes)."""
    return module.parametrizations[name].original


def check_per_expert_blocks(shape: torch.Size, blocksize: int, where: str) -> None:
    """Refuse a block size that would make blocks span two experts."""
    per_expert = shape[1:].numel()
    if per_expert % blocksize:
        raise ValueError(f"{where}: each expert holds {per_expert} values, not a multiple of the block size "
                         f"{blocksize}, so its blocks would span two experts; use a block size that divides it")


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    PyTorch adds and removes a parametrization by adding or deleting a property on the module's
    class, and ``copy.deepcopy`` of a parametrized module shares that class with the original:
    changing it for a copy would change (or break) the original. The new class has the same bases
    and attributes, so only this module is affected."""
    if not parametrize.is_parametrized(module):
        return  # the first registration makes a class of its own anyway
    cls = type(module)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)


def _unparametrize(module: nn.Module, name: str) -> None:
    """Remove the parametrization of ``module.<name>`` without touching other modules."""
    _own_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def install_4bit(module: nn.Module, name: str, packed: torch.Tensor, state: QuantState,
                 compute_dtype: torch.dtype) -> None:
    """Store ``module.<name>`` as ``packed`` bytes decoded by a parametrization (replacing a plain
    parameter, or the bytes and state of an earlier 4-bit one)."""
    if not hasattr(module, PARAMETER_ORDER):  # the order adapter layers nest in, whatever is stored how
        setattr(module, PARAMETER_ORDER, [n for n, _ in own_parameters(module)])
    if parametrize.is_parametrized(module, name):
        _unparametrize(module, name)
    _own_class(module)  # another parameter of it may be parametrized (a class shared with a copy)
    if name in module._parameters:
        del module._parameters[name]
    module.register_parameter(name, nn.Parameter(packed, requires_grad=False))
    parametrize.register_parametrization(module, name, Dequantize4bit(state, compute_dtype), unsafe=True)
    _hook_module(module)


def install_float(module: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Store ``module.<name>`` as a plain frozen parameter holding ``weight`` (a merge kept in full
    precision, or dequantizing the model)."""
    if parametrize.is_parametrized(module, name):
        _unparametrize(module, name)
    if name in module._parameters:
        del module._parameters[name]
    module.register_parameter(name, nn.Parameter(weight.detach(), requires_grad=False))


def quantize_parameter(module: nn.Module, name: str, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None,
                       where: str = "") -> None:
    """Quantize the fused expert weight ``module.<name>`` to 4 bits in place."""
    weight = getattr(module, name).detach()
    check_per_expert_blocks(weight.shape, blocksize, where or name)
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
    install_4bit(module, name, packed, state, compute_dtype or weight.dtype)


def quantize_experts(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                     compute_dtype: Optional[torch.dtype] = None,
                     only: Optional[list[tuple[str, str]]] = None) -> list[str]:
    """Quantize every fused expert weight of ``model`` (or the (module, parameter) pairs ``only``
    names) to 4 bits; returns their full names."""
    done = []
    for module_key, name in expert_parameters(model) if only is None else only:
        module = model.get_submodule(module_key)
        if quantized_parameter(module, name) is None:
            full = f"{module_key}.{name}"
            quantize_parameter(module, name, quant_type, blocksize, double_quant, compute_dtype, full)
            done.append(full)
    return done


def quantized_experts(model: nn.Module) -> list[tuple[str, str, Dequantize4bit]]:
    """(module name, parameter name, parametrization) of every 4-bit parameter in ``model``."""
    out = []
    for key, module in model.named_modules():
        lists = getattr(module, "parametrizations", None)
        if isinstance(lists, nn.ModuleDict):
            for name in lists:
                found = quantized_parameter(module, name)
                if found is not None:
                    out.append((key, name, found))
    return out


def dequantize_experts(model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """Turn every 4-bit expert weight back into a plain parameter (in place)."""
    for key, name, found in quantized_experts(model):
        module = model.get_submodule(key)
        weight = dequantize_4bit(packed_bytes(module, name), found.quant_state, dtype or found.compute_dtype)
        install_float(module, name, weight)


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the 4-bit expert weights as stored (packed bytes and scales)."""
    total = 0
    for key, name, found in quantized_experts(model):
        packed = packed_bytes(model.get_submodule(key), name)
        total += packed.numel() * packed.element_size() + found.quant_state.storage_bytes()
    return total


# ----- decoding once per call, and bitsandbytes' state-dict layout ---------------------------------
_HOOKED = "_deltatune_4bit_hooks"


def _hook_module(module: nn.Module) -> None:
    if getattr(module, _HOOKED, False):
        return
    module.register_forward_pre_hook(_enter_cache)
    module.register_forward_hook(_leave_cache, always_call=True)
    module.register_state_dict_post_hook(_bnb_keys)
    setattr(module, _HOOKED, True)


def _decoders(module: nn.Module) -> list[Dequantize4bit]:
    lists = getattr(module, "parametrizations", None)
    if not isinstance(lists, nn.ModuleDict):
        return []
    return [p for name in lists for p in lists[name] if isinstance(p, Dequantize4bit)]


def _enter_cache(module: nn.Module, args) -> None:
    # Each decoder keeps its own decoded weight for the call (not PyTorch's process-wide
    # parametrize cache, which an interrupted call would leave switched on for everything).
    for decoder in _decoders(module):
        decoder.caching, decoder.decoded = True, None


def _leave_cache(module: nn.Module, args, output) -> None:
    # Called even when the forward raised or checkpointing's recomputation stopped early; a
    # call interrupted past it is reset by the next call's pre-hook.
    for decoder in _decoders(module):
        decoder.caching, decoder.decoded = False, None


def _bnb_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``parametrizations.<name>.original`` becomes ``<name>`` with bitsandbytes' quantization keys."""
    lists = getattr(module, "parametrizations", None)
    if not isinstance(lists, nn.ModuleDict):
        return
    for name in lists:
        found = quantized_parameter(module, name)
        key = f"{prefix}parametrizations.{name}.original"
        if found is None or key not in state_dict:
            continue
        packed = state_dict.pop(key)
        state_dict.update(bnb_4bit_tensors(packed, found.quant_state, f"{prefix}{name}"))


def state_from_file(tensors: dict[str, torch.Tensor], name: str, where: str) -> tuple[torch.Tensor, QuantState]:
    """(packed, state) from a checkpoint's entries for parameter ``name`` (keys relative to its
    module: ``name``, ``name.absmax``, ...)."""
    renamed = {"weight" + k[len(name):]: v for k, v in tensors.items() if k == name or k.startswith(name + ".")}
    packed, state = state_from_tensors(renamed, where)
    if len(state.shape) != 3:
        raise ValueError(f"{where}{name}: the record's shape {list(state.shape)} is not a 3-D expert weight")
    return packed, state


def is_4bit_in_file(keys, full_name: str) -> bool:
    """The checkpoint stores parameter ``full_name`` in bitsandbytes' 4-bit layout."""
    return any(k.startswith(full_name + ".quant_state.bitsandbytes__") for k in keys)


__all__ = [
    "Dequantize4bit", "quantized_parameter", "packed_bytes", "install_4bit", "install_float",
    "quantize_parameter", "quantize_experts", "quantized_experts", "dequantize_experts", "storage_bytes",
    "state_from_file", "is_4bit_in_file", "check_per_expert_blocks", "parameter_shape",
]
