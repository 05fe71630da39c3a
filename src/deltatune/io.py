"""Adapters as files, in Hugging Face PEFT's format.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Keys are the
model's own module paths behind ``base_model.model.``, with the adapter name removed:
``...q_proj.lora_A.weight``, ``...embed_tokens.lora_embedding_A``,
``...q_proj.lora_magnitude_vector`` (DoRA), ``...k_proj.ia3_l``, ``...q_proj.hada_w1_a``,
and a ``modules_to_save`` copy under the module's plain name (``...lm_head.weight``).
Soft prompts are one tensor, ``prompt_embeddings``; VeRA's shared projections are
``base_model.vera_A``/``base_model.vera_B``. Each method's module lists its keys
(``Method.file_tensors``). Only safetensors are read, never pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.method import method_for
from .config import config_from_dict
from .files import write_atomically
from .adapter_ops import add_adapter, get_state
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """File key -> the live tensor in ``model`` for adapter ``name`` (PEFT's key layout)."""
    config = get_state(model).configs[name]
    return method_for(config).file_tensors(model, name, config)


def _is_base_key(key: str) -> bool:
    """Keys holding base-model tensors (biases, embedding weights) that a file may leave out."""
    return ".base_layer." in key or (key.endswith("bias") and ".lora_" not in key)


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], name: str = "default") -> Path:
    """Write adapter ``name`` as PEFT writes it; each file is replaced atomically."""
    state = get_state(model)
    if name not in state.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model, name).items()}
    config = state.configs[name].to_dict()
    config["inference_mode"] = True  # PEFT records saved adapters as inference-mode
    write_atomically(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    write_atomically(folder / CONFIG_NAME, lambda p: Path(p).write_text(text))
    return folder


def read_adapter_config(path: Union[str, os.PathLike]):
    """The config in ``path/adapter_config.json``, with errors that name the file and line."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}, line {err.lineno}, column {err.colno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(data).__name__}")
    return config_from_dict(data, source=str(config_file))


def load_adapter(
    model: nn.Module, path: Union[str, os.PathLike], name: str = "default", trainable: bool = False
) -> nn.Module:
    """Add the adapter saved in ``path`` (by deltatune or PEFT) to ``model`` as ``name``.

    Every tensor must find its module with the same shape; otherwise nothing is added and
    the error names the key and both shapes.
    """
    folder = Path(path)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {pickles}: deltatune reads only safetensors, never pickled files)" if pickles else ""
        raise FileNotFoundError(f"{weights} not found{hint}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    def fill(adapted: nn.Module) -> None:
        _copy_tensors(adapted, name, tensors, weights, config.base_model_name_or_path)

    return add_adapter(model, config, name, trainable=trainable, _fill=fill)


def _copy_tensors(model, name, tensors, weights_file, made_for) -> None:
    config = get_state(model).configs[name]
    method = method_for(config)
    method.prepare_load(model, name, config, tensors)
    targets = adapter_tensors(model, name)
    for_base = f" (the adapter was made for base {made_for!r})" if made_for else ""
    unexpected = [k for k in tensors if k not in targets]
    if unexpected:
        raise ValueError(
            f"{weights_file}: key {unexpected[0]!r} has no matching module in this "
            f"{type(model).__name__}{for_base}; {len(unexpected)} such key(s)"
        )
    optional = method.optional_file_keys(config)
    missing = [k for k in targets if k not in tensors and not _is_base_key(k) and k not in optional]
    if missing:
        raise ValueError(f"{weights_file}: key {missing[0]!r} is missing; {len(missing)} adapter tensor(s) missing")
    for key, value in tensors.items():
        target = targets[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{weights_file}: key {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(target.shape)} in the model{for_base}"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value.to(targets[key].device, targets[key].dtype))
