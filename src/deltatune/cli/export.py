"""``deltatune export``: an adapter in another tool's format: a DyLoRA adapter cut to one rank as a
plain PEFT LoRA adapter, or GGUF files for llama.cpp and Ollama (merged model, LoRA adapter, base)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .options import add_config_command

FORMATS = ("peft", "gguf")


@dataclass
class ExportConfig:
    """Options of ``deltatune export``."""

    adapter: str = ""
    """Adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors). Required, except for
    --gguf-kind base."""
    format: str = "peft"
    """What to write: peft (a DyLoRA adapter cut to --rank, as a plain PEFT LoRA adapter) or gguf (for llama.cpp
    and Ollama)."""
    out: str = ""
    """Folder (peft) or file (gguf; an existing folder gets the file's default name inside it) to write. Empty:
    beside the adapter, named after it (NAME-r8, NAME-merged-f16.gguf, NAME-lora-f16.gguf, BASE-f16.gguf)."""
    rank: int = 0
    """--format peft: the rank to cut the DyLoRA adapter to (required there)."""
    gguf_kind: str = "merged"
    """--format gguf: merged (the adapter folded into its base, one file to run), adapter (a GGUF LoRA adapter,
    plain LoRA only, applied to a base GGUF by llama.cpp and Ollama) or base (the base model alone, the file such
    an adapter goes with)."""
    outtype: str = "f16"
    """--format gguf: type of the matrices: f16, bf16, f32, q8_0 or q4_0 (q4_0 not for adapters); vectors stay
    f32; a matrix whose rows are not whole 32-value blocks falls back to f16 (reported)."""
    base: str = ""
    """Base model folder or .gguf file; empty for the embedded default model."""
    quantize: str = ""
    """The base was quantized in training (nf4, fp4 or int8: QLoRA): merge into the same dequantized weights."""


def default_out(cfg: ExportConfig) -> Path:
    """Where ``cfg`` writes when --out names no file: beside the adapter (or here, for a base)."""
    from ..loading import DEFAULT_NAME

    adapter = Path(cfg.adapter).resolve() if cfg.adapter else None
    if cfg.format == "peft":
        name = f"{adapter.name}-r{cfg.rank}"
    elif cfg.gguf_kind == "base":
        name = f"{Path(cfg.base).stem if cfg.base else DEFAULT_NAME}-{cfg.outtype}.gguf"
    else:
        name = f"{adapter.name}-{'lora' if cfg.gguf_kind == 'adapter' else 'merged'}-{cfg.outtype}.gguf"
    if cfg.out and cfg.format == "gguf" and (Path(cfg.out).is_dir() or cfg.out.endswith(os.sep)):
        return Path(cfg.out) / name
    if cfg.out:
        return Path(cfg.out)
    return (adapter.parent if adapter is not None else Path.cwd()) / name


def run_export(cfg: ExportConfig) -> dict:
    """Check the options, write the export, print and return a JSON summary."""
    if cfg.format not in FORMATS:
        raise ValueError(f"--format {cfg.format!r} is not one of {', '.join(FORMATS)}")
    needs_adapter = cfg.format == "peft" or cfg.gguf_kind != "base"
    if needs_adapter and not cfg.adapter:
        raise ValueError("--adapter FOLDER is required: the adapter to export")
    if cfg.adapter and not Path(cfg.adapter).is_dir():
        raise FileNotFoundError(f"--adapter {cfg.adapter} is not a folder")
    if cfg.format == "peft":
        summary = _export_rank(cfg)
    else:
        summary = _export_gguf(cfg)
    summary["config"] = asdict(cfg)
    print(json.dumps(summary, indent=2))
    return summary


def _export_rank(cfg: ExportConfig) -> dict:
    if cfg.rank <= 0:
        raise ValueError("--format peft writes a DyLoRA adapter cut to one rank: give --rank N (a positive rank), "
                         "or choose --format gguf")
    from ..export.rank import export_rank

    folder = export_rank(cfg.adapter, str(default_out(cfg)), cfg.rank)
    return {"out": str(Path(folder).resolve()), "format": "peft", "rank": cfg.rank}


def _export_gguf(cfg: ExportConfig) -> dict:
    from ..export.gguf import export_gguf

    if cfg.rank:
        raise ValueError("--rank is for --format peft; to write a DyLoRA adapter as GGUF, cut it first "
                         "(deltatune export --format peft --rank N) and export that folder")
    report = export_gguf(cfg.adapter or None, default_out(cfg), kind=cfg.gguf_kind, base=cfg.base or None,
                         quantize=cfg.quantize or None, outtype=cfg.outtype)
    return {"out": str(Path(report.path).resolve()), "format": "gguf", "report": report.to_dict()}


def add_parser(subcommands) -> None:
    def run(cfg: ExportConfig) -> int:
        run_export(cfg)
        return 0

    add_config_command(subcommands, "export", "write an adapter for other tools: a DyLoRA adapter cut to one "
                       "rank (PEFT), or GGUF files for llama.cpp and Ollama (merged model, LoRA adapter, base)",
                       ExportConfig, run)
