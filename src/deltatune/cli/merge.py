"""``deltatune merge``: fold an adapter into its base and write a plain Hugging Face folder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .options import add_config_command


@dataclass
class MergeConfig:
    """Options of ``deltatune merge``."""

    adapter: str = ""
    """Adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors). Required."""
    out: str = "merged"
    """Folder to write the merged model to."""
    base: str = ""
    """Base model folder or .gguf file; empty for the embedded default model."""
    dtype: str = "bfloat16"
    """dtype of the written weights: bfloat16, float16 or float32."""
    quantize: str = ""
    """Load the base quantized first (nf4, fp4 or int8), as it was during QLoRA training."""
    requantize: bool = False
    """Write the merged model quantized again (bitsandbytes format) instead of in full precision."""


def run_merge(cfg: MergeConfig) -> dict:
    """Merge, print the merge error, write the folder; returns a summary."""
    import torch

    from ..adapter_ops import merge, unload
    from ..io import load_adapter
    from ..loading import _parse_dtype, load_model
    from ..quant.convert import check_quant_type, dequantize_model
    from ..quant.loading import save_model

    if not cfg.adapter:
        raise ValueError("--adapter FOLDER is required: the adapter to merge into its base")
    if cfg.requantize and not cfg.quantize:
        raise ValueError("--requantize needs a quantized base: add --quantize nf4|fp4|int8")
    if not Path(cfg.adapter).is_dir():
        raise FileNotFoundError(f"--adapter {cfg.adapter} is not a folder")
    check_quant_type(cfg.quantize)
    dtype = _parse_dtype(cfg.dtype)
    model, tokenizer = load_model(cfg.base or None, dtype=torch.float32, quantize=cfg.quantize or None)
    load_adapter(model, cfg.adapter, name="default")
    report = merge(model, tokenizer=tokenizer, requantize=cfg.requantize)
    model = unload(model, merge=True)
    if not cfg.requantize:
        dequantize_model(model, dtype)
    folder = save_model(model, cfg.out, tokenizer=tokenizer, dtype=dtype)
    summary = {"out": str(Path(folder).resolve()), "report": asdict(report), "config": asdict(cfg)}
    print(json.dumps(summary, indent=2))
    return summary


def add_parser(subcommands) -> None:
    def run(cfg: MergeConfig) -> int:
        run_merge(cfg)
        return 0

    add_config_command(subcommands, "merge", "merge an adapter into its base and write a plain Hugging Face "
                       "folder; prints the merge error", MergeConfig, run)
