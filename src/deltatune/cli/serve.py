"""``deltatune serve``: an OpenAI-compatible server for the base model and many adapters at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .options import add_options, add_repeated_flag, config_from_args


@dataclass
class ServeConfig:
    """Settings of ``deltatune serve``."""

    model: str = ""
    """base model: a Hugging Face folder or .gguf file (empty: the embedded default model)"""
    adapter: list[str] = field(default_factory=list)
    """an adapter to serve, as NAME=DIR (the request's "model" field picks it by NAME)."""
    adapters_dir: str = ""
    """turns on hot loading: adapters may be loaded (and unloaded) at run time from folders under DIR only"""
    host: str = "127.0.0.1"
    """address to listen on"""
    port: int = 8000
    """port to listen on"""
    api_key: str = ""
    """require 'Authorization: Bearer KEY' on every /v1 route (empty: no key)"""
    max_batch: int = 16
    """sequences decoded together in one forward pass"""
    max_queue: int = 256
    """sequences allowed to wait; beyond it requests get 429 with Retry-After"""
    max_loaded_adapters: int = 8
    """adapters kept in memory; the least recently used idle one is unloaded and reloaded on demand"""
    quantize: str = ""
    """load the base as nf4, fp4 or int8 (empty: not quantized)"""
    dtype: str = ""
    """dtype of the base (empty: float32 on a CPU, bfloat16 on a GPU)"""
    device: str = ""
    """cpu or cuda (empty: cuda when there is one)"""
    drain_timeout: float = 30.0
    """seconds a SIGTERM waits for requests in flight before the server exits"""
    default_max_tokens: int = 256
    """completion tokens of a chat request that gives no max_tokens (plain completions: 16, as OpenAI)"""
    batching: str = "mixed"
    """mixed: requests for different adapters share forward passes; swap: one adapter at a time"""


def add_parser(subcommands) -> None:
    parser = subcommands.add_parser("serve", help="serve the base model and adapters over OpenAI's API, "
                                                  "mixing adapters in one batch")
    add_repeated_flag(parser, ServeConfig, "adapter", "adapter", "NAME=DIR")
    add_options(parser, ServeConfig, skip=("adapter",))
    parser.set_defaults(func=lambda args: serve(config_from_args(args, ServeConfig)))


def named_folders(pairs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` flags as a dict; errors name the flag."""
    out: dict[str, Path] = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter {pair!r}: expected NAME=DIR")
        if name == "base":
            raise ValueError("--adapter base=...: 'base' names the model without adapters; pick another name")
        if name in out:
            raise ValueError(f"--adapter {name}=...: the name is given twice")
        out[name] = Path(folder)
    return out


def build(cfg: ServeConfig):
    """(model, engine, app) for ``cfg``: the base loaded, the named adapters loaded."""
    import torch

    from ..loading import load_model
    from ..serve import Adapters, Engine
    from ..serve.app import create_app

    if cfg.batching not in ("mixed", "swap"):
        raise ValueError(f"--batching {cfg.batching!r}: expected mixed or swap")
    if cfg.quantize and cfg.quantize not in ("nf4", "fp4", "int8"):
        raise ValueError(f"--quantize {cfg.quantize!r}: expected nf4, fp4 or int8")
    root = Path(cfg.adapters_dir) if cfg.adapters_dir else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--adapters-dir {root}: no such folder")
    folders = named_folders(cfg.adapter)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device == "cuda" else "float32")
    model, tokenizer = load_model(cfg.model or None, dtype=dtype, quantize=cfg.quantize or None, device=device)
    model.eval()
    adapters = Adapters(model, root, max(cfg.max_loaded_adapters, 1))
    for name, folder in folders.items():
        adapters.add(name, folder.resolve())
    engine = Engine(model, tokenizer, adapters, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    mixed=cfg.batching == "mixed")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    app = create_app(engine, api_key=cfg.api_key or None, context=context, default_max_tokens=cfg.default_max_tokens)
    return model, engine, app


def serve(cfg: ServeConfig) -> int:
    import uvicorn

    _, engine, app = build(cfg)
    names = ", ".join(["base", *engine.adapters.entries])
    print(f"deltatune serve: http://{cfg.host}:{cfg.port}/ (models: {names}; batching {cfg.batching})", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning",
                timeout_graceful_shutdown=max(cfg.drain_timeout, 0.1))
    return 0
