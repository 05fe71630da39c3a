"""Loading a base model straight into FSDP2 shards, so that no rank ever holds a whole weight.

The model is built on the meta device (shapes, no storage) and the adapter is added to it; the
adapter's small tensors are real, made and initialised as in one process (so the same seed gives
the same adapter). ``fully_shard`` then cuts every parameter into rows, one slice per rank, and
each rank allocates its own rows and reads just those rows of each weight from the safetensors
files: a slice read, so the rest of the tensor is never brought into memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from ..loading import _attach_generation_config, _auto_class, load_tokenizer, model_source
from ..quant.loading import StreamingUnsupported, _Checkpoint, _rebuild_meta_buffers, weight_files


@dataclass
class ShardSource:
    """Where each rank's rows come from: the checkpoint's tensor name -> file, and the tensors
    that are real before sharding (the adapter's and the rebuilt buffers), kept whole: they are
    small, and each rank copies its rows of them back after the model's storage is allocated."""

    files: dict[str, Path]
    kept: dict[str, torch.Tensor] = field(default_factory=dict)


def load_skeleton(path_or_name: Union[str, os.PathLike, None] = None, dtype: torch.dtype = torch.float32):
    """``(model on meta, tokenizer, ShardSource)``, or ``None`` where the checkpoint cannot be read
    in slices (a GGUF file, a quantized or a non-safetensors checkpoint): the caller loads it whole."""
    from transformers import AutoConfig

    folder, gguf_file = model_source(path_or_name)
    if gguf_file is not None:
        return None
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        return None
    try:
        files = weight_files(folder)
    except StreamingUnsupported:
        return None
    names = dict(_Checkpoint(files, torch.device("cpu")))  # tensor name -> its file
    with torch.device("meta"):
        model = _auto_class(config).from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_meta_buffers(model, torch.device("cpu"))  # rotary frequencies: computed, never saved
    _attach_generation_config(model, folder)
    model.eval()
    return model, load_tokenizer(folder), ShardSource(names)


def keep_real_tensors(model: nn.Module, source: ShardSource) -> None:
    """Remember every parameter and buffer that already holds values (call before sharding)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    source.kept = {name: t.detach().clone() for name, t in tensors if not t.is_meta}


def fill_shards(model: nn.Module, root: nn.Module, source: ShardSource, rank: int, world: int,
                device: torch.device) -> None:
    """Give ``root`` (sharded with ``fully_shard``, ``model`` inside it) storage on ``device`` and
    fill each rank's rows: base weights from the files, the adapter from ``source.kept``, DoRA's
    magnitudes from the rows of both."""
    from torch.distributed.tensor import DTensor

    root.to_empty(device=device)
    magnitudes = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            start, stop = _rows(param.shape, rank, world) if isinstance(param, DTensor) else (0, param.shape[0])
            if local.shape[:1] != (stop - start,):
                raise RuntimeError(f"{name}: rank {rank} holds {tuple(local.shape)}, expected rows {start}:{stop}")
            if name in source.kept:
                local.copy_(source.kept[name][start:stop])
            elif _file_key(name) in source.files:
                local.copy_(_read_rows(source.files, _file_key(name), start, stop))
            elif ".lora_magnitude_vector." in name:
                magnitudes.append((name, local, start, stop))
            else:
                raise StreamingUnsupported(f"{name} is neither in the checkpoint nor in the adapter")
        for name, local, start, stop in magnitudes:
            local.copy_(_magnitude_rows(model, name, source, start, stop).to(local.dtype))
        for name, buffer in model.named_buffers():
            if name not in source.kept:
                raise StreamingUnsupported(f"buffer {name} was never computed")
            buffer.copy_(source.kept[name])


def _rows(shape: torch.Size, rank: int, world: int) -> tuple[int, int]:
    """The rows FSDP2 gives ``rank``: ``torch.chunk``'s split (ceil(n / world) each, the last short)."""
    chunk = -(-shape[0] // world)
    start = min(rank * chunk, shape[0])
    return start, min(start + chunk, shape[0])


def _file_key(name: str) -> str:
    """The checkpoint's name of a parameter of the adapted model (the adapter wraps each base layer)."""
    return name.replace(".base_layer.", ".")


def _read_rows(files: dict[str, Path], key: str, start: int, stop: int) -> torch.Tensor:
    with safe_open(str(files[key]), framework="pt") as handle:
        return handle.get_slice(key)[start:stop]


def _magnitude_rows(model: nn.Module, name: str, source: ShardSource, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of DoRA's starting magnitude: the row norms of the base weight's rows plus
    the matching rows of ``B @ A`` (A whole: it is ``r`` rows)."""
    from ..adapters.lora import dora_row_norms

    layer_name, _, rest = name.partition(".lora_magnitude_vector.")
    adapter = rest.split(".")[0]
    layer = model.get_submodule(layer_name)
    if getattr(layer, "transposed", False):
        raise StreamingUnsupported(f"{layer_name}: DoRA on a weight stored (in, out) is not loaded in shards")
    A = source.kept[f"{layer_name}.lora_A.{adapter}.weight"]
    B = source.kept[f"{layer_name}.lora_B.{adapter}.weight"][start:stop]
    weight = _read_rows(source.files, _file_key(f"{layer_name}.base_layer.weight"), start, stop)
    return dora_row_norms(weight, (B.float() @ A.float()) * layer.scaling[adapter])


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (meta tensors count by their shapes)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def skeleton_if_sharded(path_or_name: Optional[str], choose) -> Optional[tuple]:
    """``load_skeleton``'s result when ``choose(model bytes)`` picks FSDP2 for it, else ``None``."""
    skeleton = load_skeleton(path_or_name)
    if skeleton is None or choose(tensor_bytes(skeleton[0])) != "fsdp":
        return None
    return skeleton
