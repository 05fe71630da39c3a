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
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.low_rank.dylora import cut_to_rank
from .adapters.low_rank.lora_inits.lora_conversion import converted_to_plain_lora
from .adapters.method import method_for
from .config import config_from_dict
from .files import replace_folder_files, utf8_text
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


def gathered_adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Whole CPU copies of adapter ``name``'s tensors (file keys). A tensor sharded by FSDP2 is
    gathered from every rank first, so under FSDP2 every rank must call this, in step."""
    tensors = {}
    for key, value in adapter_tensors(model, name).items():  # the same order on every rank
        whole = value.full_tensor() if hasattr(value, "full_tensor") else value  # a DTensor shard
        tensors[key] = whole.detach().to("cpu").contiguous().clone()
    return tensors


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], name: str = "default",
                 tensors: Optional[dict[str, torch.Tensor]] = None, rank: Optional[int] = None,
                 path_initial_model_for_weight_conversion: Union[str, os.PathLike, None] = None) -> Path:
    """Write adapter ``name`` as PEFT writes it. Config and weights are replaced together: a
    reader never finds new weights beside an old config; other files in the folder stay.
    ``tensors``: the weights already gathered (``gathered_adapter_tensors``), for sharded models.
    ``rank``: write a DyLoRA adapter's first ``rank`` components as a plain PEFT LoRA adapter.
    ``path_initial_model_for_weight_conversion``: the folder where this adapter was saved right
    after an initialisation that changed the base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ); the file
    written is then a plain LoRA adapter of rank 2r for the original base, as PEFT writes it."""
    state = get_state(model)
    if name not in state.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    tensors = gathered_adapter_tensors(model, name) if tensors is None else tensors
    adapter_config = state.configs[name]
    if rank is not None:
        adapter_config, tensors = cut_to_rank(adapter_config, tensors, rank)
    if path_initial_model_for_weight_conversion is not None:
        initial = weights_file(Path(path_initial_model_for_weight_conversion))
        adapter_config, tensors = converted_to_plain_lora(adapter_config, tensors, read_weights(initial), str(initial))
    # Companion adapters (X-LoRA's experts) go first, so the main config never lacks them.
    for sub, (sub_config, sub_tensors) in method_for(adapter_config).companion_files(model, name, adapter_config).items():
        write_adapter_files(Path(path) / sub, sub_config, sub_tensors)
    return write_adapter_files(path, adapter_config, tensors)


def write_adapter_files(path: Union[str, os.PathLike], adapter_config, tensors: dict[str, torch.Tensor]) -> Path:
    """Replace ``path``'s config and weights together with ``adapter_config`` and ``tensors``."""
    config = adapter_config.to_dict()
    config["inference_mode"] = True  # PEFT records saved adapters as inference-mode
    text = json.dumps(config, indent=2, sort_keys=True)
    return replace_folder_files(path, {
        WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
        CONFIG_NAME: lambda p: Path(p).write_text(text),
    })


def _check_link(folder: Path, file: Path) -> None:
    """Refuse a file of an adapter folder that is a symbolic link leading out of the folder.

    Hugging Face's hub cache keeps ``<repo>/snapshots/<revision>/<file>`` as links to
    ``<repo>/blobs/<hash>``, so a link into the ``blobs`` folder of the cache repo that holds
    the snapshot is allowed too. Anything else (``/etc/passwd``, another project's file) is not.
    """
    target, root = file.resolve(), folder.resolve()
    allowed = [root] + [p.parent / "blobs" for p in (root, *root.parents) if p.name == "snapshots"]
    if not any(target.is_relative_to(place) for place in allowed):
        raise ValueError(f"{file} is a symbolic link to {target}, outside the adapter folder; "
                         "adapter files are read only from inside their folder (or a hub cache's blobs)")


def read_adapter_config(path: Union[str, os.PathLike]):
    """The config in ``path/adapter_config.json``, with errors that name the file and line."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    _check_link(folder, config_file)
    try:
        data = json.loads(utf8_text(config_file.read_bytes(), str(config_file)))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}, line {err.lineno}, column {err.colno}: invalid JSON ({err.msg})") from None
    except RecursionError:  # the json module parses nested values recursively
        raise ValueError(f"{config_file}: values nested too deeply") from None
    except ValueError as err:
        if str(config_file) in str(err):
            raise
        raise ValueError(f"{config_file}: invalid JSON ({err})") from None  # e.g. an integer of 5000 digits
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(data).__name__}")
    return config_from_dict(data, source=str(config_file))


def weights_file(folder: Path) -> Path:
    """``folder``'s safetensors weights; a missing file is an error that names any pickled
    weights found instead (never read), and a link out of the folder is refused."""
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")) \
            if folder.is_dir() else []
        hint = f" (found {pickles}: deltatune reads only safetensors, never pickled files)" if pickles else ""
        raise FileNotFoundError(f"{weights} not found{hint}")
    _check_link(folder, weights)
    return weights


def load_adapter(
    model: nn.Module, path: Union[str, os.PathLike], name: str = "default", trainable: bool = False
) -> nn.Module:
    """Add the adapter saved in ``path`` (by deltatune or PEFT) to ``model`` as ``name``.

    Every tensor must find its module with the same shape; otherwise nothing is added and
    the error names the key and both shapes. Every error names the folder or the file.
    """
    folder = Path(path)
    config = read_adapter_config(folder)
    method_for(config).locate_companions(config, folder)
    weights = weights_file(folder)
    tensors = read_weights(weights)

    base_tensors = {id(p) for p in model.parameters()}  # before the adapter adds its own

    def fill(adapted: nn.Module) -> None:
        _copy_tensors(adapted, name, tensors, weights, config.base_model_name_or_path, base_tensors)

    try:
        return add_adapter(model, config, name, trainable=trainable, _fill=fill)
    except ValueError as err:
        # Errors about the model (target_modules matching nothing, ...) name the adapter too.
        if type(err) is not ValueError or str(folder) in str(err):
            raise
        raise ValueError(f"{folder}: {err}") from None


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a pickle or a damaged file is a ValueError naming it."""
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    except Exception as err:  # safetensors' Python side on a header it cannot map (dtype, shape)
        raise ValueError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    for key, value in tensors.items():  # dtypes are checked against the model in _copy_tensors
        if value.is_floating_point() and not torch.isfinite(value.float()).all():
            raise ValueError(f"{weights}: key {key!r} holds NaN or infinite values")
    return tensors


def _copy_tensors(model, name, tensors, weights_file, made_for, base_tensors: set[int]) -> None:
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
    # A file may leave out base-model biases it trained (they keep the base values), never the
    # adapter's own tensors, even where those are biases too (a bottleneck's adapter_down.bias).
    missing = [k for k, t in targets.items() if k not in tensors and k not in optional
               and not (_is_base_key(k) and id(t) in base_tensors)]
    if missing:
        raise ValueError(f"{weights_file}: key {missing[0]!r} is missing; {len(missing)} adapter tensor(s) missing")
    for key, value in tensors.items():
        target = targets[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{weights_file}: key {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(target.shape)} in the model{for_base}"
            )
        # float16/bfloat16/float64 files load into a float32 model; integers, booleans and
        # complex numbers in place of weights would be converted silently and wrongly.
        if value.dtype != target.dtype and not (value.is_floating_point() and target.is_floating_point()):
            raise ValueError(f"{weights_file}: key {key!r} has dtype {value.dtype} in the file but "
                             f"{target.dtype} in the model")
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value.to(targets[key].device, targets[key].dtype))
