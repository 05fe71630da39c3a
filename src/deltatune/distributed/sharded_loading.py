"""Loading a base model straight into FSDP2 shards, so that no rank ever holds a whole weight.

The model is built on the meta device (shapes, no storage) and the adapter is added to it; the
adapter's small tensors are real, made and initialised as in one process (so the same seed gives
the same adapter). ``fully_shard`` then cuts every parameter into rows, one slice per rank, and
each rank allocates its own rows and reads just those rows of each weight from the safetensors
files: a slice read, so the rest of the tensor is never brought into memory. A base quantized to
4 bits while loading is quantized the same way, from each rank's rows, and a checkpoint saved in 4
bits is read as its packed rows (``sharded_4bit``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from ..loading import _attach_generation_config, _auto_class, load_tokenizer, model_source
from ..module_tree import replace_module
from ..quant.convert import QuantizeConfig, is_conv1d, mark_quantized, quantizable_linears
from ..quant.layers import Linear4bit, state_from_tensors
from ..quant.loading import StreamingUnsupported, _Checkpoint, _rebuild_meta_buffers, weight_files, where_is_quantized
from .sharded_4bit import dequantized_rows, fill_4bit_layer, fill_saved_4bit_layer, meta_linear4bit, rows_of


@dataclass
class ShardSource:
    """Where each rank's rows come from: the checkpoint's tensor name -> file, and the tensors
    that are real before sharding (the adapter's and the rebuilt buffers), kept whole: they are
    small, and each rank copies its rows of them back after the model's storage is allocated."""

    files: dict[str, Path]
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    saved_4bit: set[str] = field(default_factory=set)  # weights the files hold already packed (their keys)


def load_skeleton(path_or_name: Union[str, os.PathLike, None] = None, dtype: torch.dtype = torch.float32,
                  quant: Optional[QuantizeConfig] = None):
    """``(model on meta, tokenizer, ShardSource)``, or ``None`` where the checkpoint cannot be read
    in slices (a GGUF file, a non-safetensors checkpoint, int8, a GPT-2 ``Conv1D`` in 4 bits): the
    caller loads it whole. ``quant`` (NF4/FP4) makes the linear layers 4-bit layers on meta,
    quantized into each rank's shards by ``fill_shards``; a checkpoint saved in 4 bits (bitsandbytes'
    layout) gets them too, and each rank reads its rows of the packed bytes and scales."""
    from transformers import AutoConfig

    folder, gguf_file = model_source(path_or_name)
    if gguf_file is not None or (quant is not None and quant.quant_type == "int8"):
        return None
    config = AutoConfig.from_pretrained(folder)
    saved = getattr(config, "quantization_config", None)
    if saved is not None:  # load_model's reading of it; anything it refuses, it refuses loading whole
        saved = saved if isinstance(saved, dict) else saved.to_dict()
        try:
            stored = QuantizeConfig.from_hf(saved, compute_dtype=dtype)
        except ValueError:
            return None
        if stored.quant_type == "int8" or (quant is not None and quant.quant_type != stored.quant_type):
            return None
        quant = stored
        del config.quantization_config
    try:
        files = weight_files(folder)
    except StreamingUnsupported:
        return None
    names = dict(_Checkpoint(files, torch.device("cpu")))  # tensor name -> its file
    with torch.device("meta"):
        model = _auto_class(config).from_config(config, dtype=dtype)
    source = ShardSource(names)
    if quant is not None and not _make_4bit_on_meta(model, quant, source, saved is not None):
        return None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_meta_buffers(model, torch.device("cpu"))  # rotary frequencies: computed, never saved
    _attach_generation_config(model, folder)
    model.eval()
    return model, load_tokenizer(folder), source


def _make_4bit_on_meta(model: nn.Module, quant: QuantizeConfig, source: ShardSource, saved: bool) -> bool:
    """Swap each linear layer ``quant`` selects (``saved``: that the files hold packed) for a 4-bit
    layer on meta; False (nothing changed) where one cannot be filled from row slices (a
    ``Conv1D``, or a weight not in the files)."""
    files = source.files
    targets = quantizable_linears(model, quant)
    if saved:
        targets = [k for k in targets if k + ".weight" in files and where_is_quantized(files, k)]
    if any(is_conv1d(model.get_submodule(k)) or k + ".weight" not in files for k in targets):
        return False
    for key in targets:
        linear = model.get_submodule(key)
        layer = _saved_4bit_layer(files, key, linear, quant) if saved else \
            meta_linear4bit(linear, quant, _meta_like(files, key + ".weight").dtype)
        replace_module(model, key, layer)
    if saved:
        source.saved_4bit = {k + ".weight" for k in targets}
    mark_quantized(model, quant)
    return True


def _saved_4bit_layer(files: dict[str, Path], key: str, linear: nn.Module, quant: QuantizeConfig) -> Linear4bit:
    """A 4-bit layer on meta whose record, code and nested scales (small) are read from the files
    now, and whose packed bytes and block scales each rank reads later, its rows only."""
    small = {}
    for name in [k for k in files if k.startswith(key + ".weight")]:
        suffix = name[len(key) + 1:]
        if suffix in ("weight", "weight.absmax"):  # shapes and dtypes only
            small[suffix] = _meta_like(files, name)
        else:
            small[suffix] = _read_rows(files, name, 0, None)
    packed, state = state_from_tensors(small, key + ".")
    if (state.shape[0], state.shape[1]) != tuple(linear.weight.shape):
        raise ValueError(f"{key}: the checkpoint holds a {state.shape[0]}x{state.shape[1]} weight, the model "
                         f"expects {linear.weight.shape[0]}x{linear.weight.shape[1]}")
    return Linear4bit(packed, state, linear.bias, quant.compute_dtype)


def _meta_like(files: dict[str, Path], key: str) -> torch.Tensor:
    """A meta tensor with the shape and dtype of the checkpoint tensor ``key`` (nothing is read)."""
    with safe_open(str(files[key]), framework="pt") as handle:
        view = handle.get_slice(key)
        return torch.empty(view.get_shape(), dtype=view[0:0].dtype, device="meta")


def keep_real_tensors(model: nn.Module, source: ShardSource) -> None:
    """Remember every parameter and buffer that already holds values (call before sharding)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    source.kept = {name: t.detach().clone() for name, t in tensors if not t.is_meta}


def fill_shards(model: nn.Module, root: nn.Module, source: ShardSource, rank: int, world: int,
                device: torch.device, compute_device: Optional[torch.device] = None) -> None:
    """Give ``root`` (sharded with ``fully_shard``, ``model`` inside it) storage on ``device`` and
    fill each rank's rows: base weights from the files (4-bit layers quantized from their rows),
    the adapter from ``source.kept``, DoRA's magnitudes from the rows of both. ``compute_device``
    (default ``device``) holds what every rank keeps whole: 4-bit layers' nested scales."""
    from torch.distributed.tensor import DTensor

    root.to_empty(device=device)
    read = functools.partial(_read_rows, source.files)
    filled, decoded = set(), {}
    with_norms = {n.partition(".lora_magnitude_vector.")[0] + ".base_layer" for n, _ in model.named_parameters()
                  if ".lora_magnitude_vector." in n}  # DoRA's starting norms need every block's scale
    for name, layer in model.named_modules():  # the same order on every rank: each may hold a collective
        if isinstance(layer, Linear4bit):
            key = _file_key(name + ".weight")
            if key in source.saved_4bit:
                scales = fill_saved_4bit_layer(layer, read, key, rank, world, compute_device or device,
                                               name in with_norms)
            else:
                scales = fill_4bit_layer(layer, read, key, rank, world, compute_device or device, name in with_norms)
            if name in with_norms:
                decoded[name] = scales
            filled |= {name + ".weight", name + ".absmax"}
    magnitudes = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in filled:
                continue
            sharded = isinstance(param, DTensor)
            local = param.to_local() if sharded else param
            start, stop = rows_of(param.shape[0], rank, world) if sharded else (0, param.shape[0])
            if local.shape[:1] != (stop - start,):
                raise RuntimeError(f"{name}: rank {rank} holds {tuple(local.shape)}, expected rows {start}:{stop}")
            if name in source.kept:
                local.copy_(source.kept[name][start:stop])
            elif _file_key(name) in source.files:
                _copy_rows(local, source.files, _file_key(name), start)
            elif ".lora_magnitude_vector." in name:
                magnitudes.append((name, local, start, stop))
            else:
                raise StreamingUnsupported(f"{name} is neither in the checkpoint nor in the adapter")
        for name, local, start, stop in magnitudes:
            local.copy_(_magnitude_rows(model, name, source, start, stop, decoded).to(local.dtype))
        for name, buffer in model.named_buffers():
            if name not in source.kept:
                raise StreamingUnsupported(f"buffer {name} was never computed")
            buffer.copy_(source.kept[name])


def _file_key(name: str) -> str:
    """The checkpoint's name of a parameter of the adapted model (the adapter wraps each base layer)."""
    return name.replace(".base_layer.", ".")


READ_CHUNK_BYTES = 16 * 2 ** 20  # rows read at a time: a rank's part of a weight is never in memory twice


def _copy_rows(local: torch.Tensor, files: dict[str, Path], key: str, start: int) -> None:
    """Fill ``local`` with rows ``start:start + len(local)`` of ``key``, a chunk of rows at a time,
    so that the rows read and the rank's own storage do not both hold a whole shard at once."""
    if local.shape[0] == 0:
        return
    row_bytes = max(1, local[0].numel() * local.element_size())
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    for first in range(0, local.shape[0], step):
        last = min(first + step, local.shape[0])
        local[first:last].copy_(_read_rows(files, key, start + first, start + last))


def _read_rows(files: dict[str, Path], key: str, start: int, stop: Optional[int]) -> torch.Tensor:
    """Rows ``start:stop`` of the checkpoint tensor ``key`` (``stop`` None: to the end)."""
    with safe_open(str(files[key]), framework="pt") as handle:
        return handle.get_slice(key)[start:stop]


def _magnitude_rows(model: nn.Module, name: str, source: ShardSource, start: int, stop: int,
                    decoded: dict) -> torch.Tensor:
    """Rows ``start:stop`` of DoRA's starting magnitude: the row norms of the base weight's rows
    (dequantized, for a 4-bit base) plus the matching rows of ``B @ A`` (A whole: it is ``r`` rows)."""
    from ..adapters.low_rank.lora import dora_row_norms

    layer_name, _, rest = name.partition(".lora_magnitude_vector.")
    adapter = rest.split(".")[0]
    layer = model.get_submodule(layer_name)
    if getattr(layer, "transposed", False):
        raise StreamingUnsupported(f"{layer_name}: DoRA on a weight stored (in, out) is not loaded in shards")
    A = source.kept[f"{layer_name}.lora_A.{adapter}.weight"]
    B = source.kept[f"{layer_name}.lora_B.{adapter}.weight"][start:stop]
    key = _file_key(f"{layer_name}.base_layer.weight")
    if isinstance(layer.base_layer, Linear4bit):
        base = layer.base_layer
        weight = dequantized_rows(base, functools.partial(_read_rows, source.files), key, start, stop,
                                  decoded.get(f"{layer_name}.base_layer"), key in source.saved_4bit)
        weight = weight.to(base.compute_dtype)
    else:
        weight = _read_rows(source.files, key, start, stop)
    return dora_row_norms(weight, (B.float() @ A.float()) * layer.scaling[adapter])


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (meta tensors count by their shapes)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def skeleton_if_sharded(path_or_name: Optional[str], choose, quant: Optional[QuantizeConfig] = None) -> Optional[tuple]:
    """``load_skeleton``'s result when ``choose(model bytes)`` picks FSDP2 for it, else ``None``."""
    skeleton = load_skeleton(path_or_name, quant=quant)
    if skeleton is None or choose(tensor_bytes(skeleton[0])) != "fsdp":
        return None
    return skeleton
