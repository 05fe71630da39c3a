"""Load a base model quantized layer by layer, and save a (quantized) base model.

Peak memory while loading stays near the quantized model plus one full-precision tensor:
the model is built on the ``meta`` device (no storage), then each tensor is read from the
safetensors file on its own, quantized if it belongs to a quantized linear layer, and put in
place. Folders written by transformers + bitsandbytes (and by ``save_model``) load without
bitsandbytes. Fused expert weights of mixture-of-experts models are read (or quantized) one
parameter at a time the same way.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..files import replace_folder_files
from ..module_tree import replace_module
from ..targeting_experts import expert_parameters, parameter_shape
from .convert import (
    QuantizeConfig, linear_weight, make_quant_linear, mark_quantized, quantizable_experts, quantizable_linears,
    quantizes_experts,
)
from .experts import install_4bit, is_4bit_in_file, quantize_parameter, state_from_file
from .layers import Linear4bit, Linear8bit, QuantLinear, state_from_tensors


class StreamingUnsupported(Exception):
    """The model cannot be filled tensor by tensor (the caller falls back to a full load)."""


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err})") from None
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise StreamingUnsupported(f"{folder} has no model.safetensors")


class _Checkpoint(dict):
    """Tensor name -> file, for a safetensors checkpoint; ``read`` brings one tensor to ``device``."""

    def __init__(self, files: list[Path], device: torch.device):
        super().__init__()
        self.device = device
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    self[key] = f

    def read(self, key: str) -> torch.Tensor:
        # One open per tensor: the file's memory map is dropped right after, so pages read
        # for earlier tensors do not pile up in the process's memory.
        with safe_open(str(self[key]), framework="pt") as handle:
            return handle.get_tensor(key).to(self.device)


def _put(model: nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if value.is_floating_point():
        value = value.to(dtype)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point())
    elif attr in owner._buffers:
        owner._buffers[attr] = value.to(owner._buffers[attr].dtype)
    else:
        raise StreamingUnsupported(f"{key}: no such parameter or buffer in {type(owner).__name__}")


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers computed in ``__init__`` and never saved (rotary frequencies) are rebuilt from config."""
    for name, module in model.named_modules():
        meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise StreamingUnsupported(f"{name}: buffers {meta} are not in the checkpoint")
        fresh = type(module)(config)
        for b in meta:
            module._buffers[b] = fresh._buffers[b].to(device)


def load_streaming(folder: Path, auto_class, config, dtype: torch.dtype,
                   quant: Optional[QuantizeConfig], prequantized: bool,
                   device: Union[str, torch.device, None] = None) -> nn.Module:
    """Build ``auto_class`` from ``config`` on meta and fill it from ``folder`` tensor by tensor.

    ``quant``: quantize the layers it selects while loading. ``prequantized``: the files hold
    bitsandbytes-format quantized layers already (``quant`` then describes them). ``device``:
    each tensor goes there as it is read, so a GPU quantizes and the CPU never holds the model.
    """
    where = _Checkpoint(weight_files(folder), torch.device(device or "cpu"))
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype)
    targets = set(quantizable_linears(model, quant)) if quant is not None else set()
    if prequantized:  # the file, not the model's head rule, says which layers are quantized
        targets = {k for k in targets if k + ".weight" in where and where_is_quantized(where, k)}
    for key in sorted(targets):
        linear = model.get_submodule(key)
        replace_module(model, key, _quant_layer_from_file(where, key, linear, quant, prequantized))
        _return_free_memory()
    experts = _load_experts(model, where, quant, prequantized, dtype)
    expected = model.state_dict(keep_vars=True)
    for key, tensor in expected.items():
        if key.startswith(tuple(t + "." for t in targets)) or key in experts or key.startswith(
                tuple(e + "." for e in experts)):
            continue
        if key not in where:
            if tensor.is_meta and not _is_tied(model, key):
                raise StreamingUnsupported(f"{key} is not in the checkpoint")
            continue
        _put(model, key, where.read(key), dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_meta_buffers(model, where.device)
    left = [k for k, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor) and t.is_meta]
    if left:
        raise StreamingUnsupported(f"tensors still unset after loading: {left[:5]}")
    if quant is not None:
        mark_quantized(model, quant)
    return model


def _load_experts(model: nn.Module, where: _Checkpoint, quant: Optional[QuantizeConfig], prequantized: bool,
                  dtype: torch.dtype) -> set[str]:
    """Fill the fused expert weights of a mixture-of-experts model that are (or become) 4-bit: read
    from bitsandbytes' keys where the file stores them so, quantized as they are read where ``quant``
    asks for it; returns their full names (the others load as any tensor)."""
    if quant is None:
        return set()
    wanted = set(quantizable_experts(model, quant)) if not prequantized and quantizes_experts(model, quant) \
        else set()
    done = set()
    for module_key, name in expert_parameters(model):
        full = f"{module_key}.{name}"
        module = model.get_submodule(module_key)
        if is_4bit_in_file(where, full):
            entries = {k[len(module_key) + 1:]: where.read(k) for k in where if k == full or k.startswith(full + ".")}
            packed, state = state_from_file(entries, name, module_key + ".")
            if state.shape != parameter_shape(module, name):
                raise ValueError(f"{full}: the checkpoint holds a {list(state.shape)} expert weight, the model "
                                 f"expects {list(parameter_shape(module, name))}")
            install_4bit(module, name, packed, state, quant.compute_dtype)
        elif (module_key, name) in wanted and full in where:
            module._parameters[name] = nn.Parameter(where.read(full).to(dtype), requires_grad=False)
            quantize_parameter(module, name, quant.quant_type, quant.blocksize, quant.double_quant,
                               quant.compute_dtype, full)
        else:
            continue
        done.add(full)
        _return_free_memory()
    return done


def _libc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim() if os.name == "posix" else None


def _return_free_memory() -> None:
    """Give the temporaries of the last layer back to the OS (glibc keeps freed heap pages).

    Without this the process's resident size grows by fragments of every layer's
    temporaries, and the peak is what decides whether a big model fits.
    """
    if _TRIM is not None:
        _TRIM(0)


def where_is_quantized(where: _Checkpoint, key: str) -> bool:
    return any(k.startswith(key + ".weight.quant_state.") for k in where) or key + ".SCB" in where


def _is_tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return bool(tied and head is not None and key.endswith("weight") and model.get_submodule(
        key.rpartition(".")[0]) is head)


def _quant_layer_from_file(where: _Checkpoint, key: str, linear: nn.Module, quant: QuantizeConfig,
                           prequantized: bool) -> QuantLinear:
    bias = where.read(key + ".bias") if key + ".bias" in where else None
    out_features, in_features = linear_weight(linear).shape
    if not prequantized:
        full = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        full.weight = nn.Parameter(linear_weight(linear, where.read(key + ".weight")), requires_grad=False)
        if bias is not None:
            full.bias = nn.Parameter(bias, requires_grad=False)
        return make_quant_linear(full, quant)
    if key + ".SCB" in where:
        layer = Linear8bit(where.read(key + ".weight"), where.read(key + ".SCB").float(), bias,
                           quant.compute_dtype)
    else:
        tensors = {k[len(key) + 1:]: where.read(k) for k in where if k.startswith(key + ".weight")}
        packed, state = state_from_tensors(tensors, key + ".")
        layer = Linear4bit(packed, state, bias, quant.compute_dtype)
    if (layer.out_features, layer.in_features) != (out_features, in_features):
        raise ValueError(f"{key}: the checkpoint holds a {layer.out_features}x{layer.in_features} weight, the "
                         f"model expects {out_features}x{in_features}")
    return layer


def save_model(model: nn.Module, path: Union[str, os.PathLike], tokenizer=None,
               dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` as a Hugging Face folder (weights, config, tokenizer), replaced as a unit.

    Quantized layers are written in bitsandbytes' layout with ``quantization_config`` in the
    config, so transformers + bitsandbytes and ``dt.load_model`` both read the folder.
    ``dtype`` casts the full-precision tensors (not the packed ones).
    """
    folder = Path(path)
    state = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = _names_of(model, head) if tied and head is not None else set()
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight") and key.rpartition(".")[0] in head_names:
            continue  # written once, under the embedding's name, as transformers does
        if value.data_ptr() in seen and value.numel() > 1:
            if not _is_quant_state_key(key):
                continue  # a tied weight, written once
            value = value.clone()  # a code table quantized tensors share: bitsandbytes wants it under each
        seen[value.data_ptr()] = key
        if dtype is not None and value.is_floating_point() and not _is_quant_state_key(key):
            value = value.to(dtype)
        tensors[key] = value.detach().to("cpu").contiguous()
    files = {"model.safetensors": lambda p: save_file(tensors, p, metadata={"format": "pt"})}
    config = getattr(model, "config", None)
    if config is not None:
        if dtype is not None:
            config.dtype = dtype
        config_text = config.to_json_string(use_diff=False)
        files["config.json"] = lambda p: Path(p).write_text(config_text)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation_text = generation.to_json_string(use_diff=True)
        files["generation_config.json"] = lambda p: Path(p).write_text(generation_text)
    if tokenizer is not None:
        files.update(_tokenizer_files(tokenizer))
    replace_folder_files(folder, files)
    return folder


def _tokenizer_files(tokenizer) -> dict:
    """The tokenizer's files as writers for ``replace_folder_files`` (saved once to a scratch
    folder and held in memory: they are small)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="deltatune-tokenizer-") as scratch:
        tokenizer.save_pretrained(scratch)
        contents = {p.name: p.read_bytes() for p in Path(scratch).iterdir() if p.is_file()}
    return {name: (lambda target, data=data: Path(target).write_bytes(data)) for name, data in contents.items()}


def _names_of(model: nn.Module, module: nn.Module) -> set[str]:
    return {k for k, m in model.named_modules(remove_duplicate=False) if m is module}


def _is_quant_state_key(key: str) -> bool:
    return any(part in key for part in (".absmax", ".quant_map", ".nested_", ".quant_state.", ".SCB"))


def warn_fallback(reason: str) -> None:
    warnings.warn(f"loading in full precision first, then quantizing (peak memory is the full model): {reason}",
                  stacklevel=3)
