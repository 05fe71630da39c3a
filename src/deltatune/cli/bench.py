"""``deltatune bench``: the same training step with deltatune and with HF PEFT, side by side.

Each (case, tool) runs in its own process (``deltatune.bench.worker``), so memory figures are
its own; warm-up steps are excluded and the median step is reported. The ratio column is
deltatune / PEFT measured in this one invocation, on this machine.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .options import add_config_command

CPU_CASES = ["lora", "lora+dropout+bias", "dora", "dora+dropout", "lora+checkpointing",
             "lora+dropout+bias+checkpointing", "dora+checkpointing", "full"]
QUANT_CASES = ["qlora", "qlora+checkpointing", "qlora+recipe", "qdora", "qdora+checkpointing", "qdora+recipe"]
GPU_CASES = [*CPU_CASES[:-1], "lora+offload", *QUANT_CASES, "full"]
MOE_CASES = ["moe-lora", "moe-lora+checkpointing"]  # the default on a mixture-of-experts shape


@dataclass
class BenchConfig:
    """Settings of a benchmark run; 0 or empty means the device's default."""

    device: str = ""
    """cpu or cuda; empty: cuda when available."""
    shape: str = ""
    """default (the embedded model), llama-1b (random init), the mixture-of-experts shapes qwen3-moe-cpu and qwen3-30b-a3b-2l (random init, Qwen3-MoE layers; two layers of Qwen3-30B-A3B for the latter), or a Hugging Face config folder; empty: default on cpu, llama-1b on cuda."""
    cases: list = field(default_factory=list)
    """Cases to run: lora, lora+dropout+bias, dora, each also +checkpointing, dora+dropout, lora+offload (saved activations in CPU memory; cuda), full (fine-tuning, transformers alone), qlora and qdora (NF4 base with double quantization, against transformers + bitsandbytes + PEFT), each also +checkpointing and +recipe (PEFT with prepare_model_for_kbit_training and checkpointing), moe-lora (mixture-of-experts shapes: the attention projections and the fused expert weights through target_parameters), also +checkpointing; empty: all that the device runs (the 4-bit cases on cuda only), or the moe cases on a mixture-of-experts shape."""
    tools: list = field(default_factory=lambda: ["deltatune", "peft"])
    """Tools to run each adapter case with."""
    batch_size: int = 0
    """Rows per step; 0: 4."""
    seq_len: int = 0
    """Tokens per row; 0: 256 on cpu, 2048 on cuda."""
    dtype: str = ""
    """float32 or bfloat16 for the base and the adapters; empty: float32 on cpu, bfloat16 on cuda."""
    precision: str = "fp32"
    """The step's arithmetic for every tool: fp32, bf16 (autocast: bf16 matmuls, weights and optimizer states as stored), or auto (what deltatune train picks on this device: bf16 on GPUs, and on CPUs that multiply bf16 faster than float32)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha."""
    optimizer: str = "adamw"
    """adamw, adamw_8bit, paged_adamw_8bit or paged_adamw: the same optimizer (make_optimizer's) for every tool."""
    labels: str = "answers"
    """answers: loss on the completions of the default job's examples (instruction tuning); all: on every token."""
    steps: int = 0
    """Timed steps (the median is reported); 0: 5 on cpu, 20 on cuda."""
    warmup: int = 0
    """Untimed steps first; 0: 2 on cpu, 5 on cuda."""
    flops: bool = True
    """Count each step's FLOPs (one extra step per run) for TFLOP/s and MFU."""
    memory: bool = False
    """Also print where each run's peak memory comes from."""
    output_dir: str = ""
    """Folder for bench.json, bench.md and bench.png; empty: runs/bench-<time>."""
    seed: int = 0
    """Seed for random shapes and adapter initialisation."""
    peft_allocator: str = "same"
    """Host memory allocator of the PEFT runs: same (the one this command runs under, deltatune's choice; see allocator.py) or system (glibc's malloc, as a plain Python script with PEFT runs on Linux)."""


def _resolved(cfg: BenchConfig) -> BenchConfig:
    import torch

    from ..bench.cases import CASES, SHAPES
    from ..bench.moe import MOE_SHAPES, is_moe_shape

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: {cfg.device!r} is not cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA device")
    gpu = device == "cuda"
    defaults = {"device": device, "shape": cfg.shape or ("llama-1b" if gpu else "default"),
                "cases": cfg.cases or list(MOE_CASES if is_moe_shape(cfg.shape) else GPU_CASES if gpu else CPU_CASES),
                "batch_size": cfg.batch_size or 4,
                "seq_len": cfg.seq_len or (2048 if gpu else 256), "dtype": cfg.dtype or ("bfloat16" if gpu else "float32"),
                "steps": cfg.steps or (20 if gpu else 5), "warmup": cfg.warmup or (5 if gpu else 2)}
    out = BenchConfig(**{**asdict(cfg), **defaults})
    unknown = [c for c in out.cases if c not in CASES]
    if unknown:
        raise ValueError(f"--cases: {unknown} are not known; choose from {list(CASES)}")
    if any(CASES[c].experts for c in out.cases) and not is_moe_shape(out.shape):
        raise ValueError(f"--cases: the moe cases adapt expert weights; --shape {out.shape} is not a mixture-of-experts "
                         f"shape (choose {', '.join(MOE_SHAPES)} or a config folder with num_experts)")
    if not gpu and any(CASES[c].offload for c in out.cases):
        raise ValueError("--cases: lora+offload moves activations from GPU to CPU memory; it needs --device cuda")
    if "peft" in out.tools and any(CASES[c].quantize for c in out.cases):
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModuleNotFoundError("--cases: the 4-bit cases run PEFT on transformers + bitsandbytes, which is "
                                      "not installed (pip install bitsandbytes), or run --tools deltatune alone")
    bad_tools = [t for t in out.tools if t not in ("deltatune", "peft")]
    if bad_tools or not out.tools:
        raise ValueError(f"--tools: {bad_tools or out.tools} — choose from deltatune, peft")
    if out.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype: {out.dtype!r} is not float32 or bfloat16")
    if out.precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"--precision: {out.precision!r} is not fp32, bf16 or auto")
    if out.precision == "auto":
        from ..hardware import auto_precision

        out.precision = auto_precision(torch.device(device))
    from ..train.optimizers import OPTIMIZERS

    if out.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer: {out.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if out.peft_allocator not in ("same", "system"):
        raise ValueError(f"--peft-allocator: {out.peft_allocator!r} is not same or system")
    if out.labels not in ("answers", "all"):
        raise ValueError(f"--labels: {out.labels!r} is not answers or all")
    if out.shape not in ("default", *SHAPES, *MOE_SHAPES) and not (Path(out.shape) / "config.json").is_file():
        raise ValueError(f"--shape: {out.shape!r} is not default, {', '.join([*SHAPES, *MOE_SHAPES])} or a folder "
                         "with config.json")
    for name in ("batch_size", "seq_len", "r", "alpha", "steps", "warmup"):
        if getattr(out, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(out, name)} must be at least 1")
    if "peft" in out.tools:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ModuleNotFoundError("--tools peft: HF PEFT is not installed (pip install peft), "
                                      "or run --tools deltatune alone")
    return out


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the benchmark; writes bench.json, bench.md and bench.png and returns the result."""
    from ..bench.cases import CASES, labelled_share, sft_batch
    from ..bench.run import (device_name, markdown, memory_markdown, run_one, summarise, tools_for, versions,
                             write_outputs)

    cfg = _resolved(cfg)
    folder = Path(cfg.output_dir or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = []
    for case in cfg.cases:
        for tool in tools_for(case, cfg.tools):
            spec = {"tool": tool, "case": CASES[case].to_dict(), "device": cfg.device, "shape": cfg.shape,
                    "dtype": cfg.dtype, "precision": cfg.precision, "batch": cfg.batch_size, "seq_len": cfg.seq_len, "r": cfg.r,
                    "alpha": cfg.alpha, "labels": cfg.labels, "optimizer": cfg.optimizer, "steps": cfg.steps,
                    "warmup": cfg.warmup, "seed": cfg.seed, "count_flops": cfg.flops,
                    "allocator": "system" if tool == "peft" and cfg.peft_allocator == "system" else "same"}
            row = run_one(spec, log)
            if "error" not in row:
                path = f", experts: {row['expert_path']}" if "expert_path" in row else ""
                log(f"{case} / {tool}: {row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_memory_mib']:,.0f} MiB{path}")
            rows.append(row)
    share = labelled_share(sft_batch(1, cfg.seq_len, 1 << 30, cfg.labels))
    device = device_name(cfg.device)
    result = {"device": device, "settings": asdict(cfg), "versions": versions(), "labelled_share": share,
              "command": "deltatune bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
              "rows": rows, "summary": summarise(rows, device)}
    write_outputs(result, folder)
    log("\n" + markdown(result))
    if cfg.memory:
        log(memory_markdown(result))
    log(f"written to {folder}")
    return result


def _exit_code(result: dict) -> int:
    failed = any("error" in r for r in result["rows"])
    mismatched = [line["case"] for line in result["summary"] if line.get("same_first_loss") is False]
    if mismatched:  # the two tools must compute the same loss on the same weights and batch
        print(f"deltatune bench: first-step losses differ between the tools in {mismatched}", file=sys.stderr)
    return 1 if failed or mismatched else 0


def add_parser(subcommands) -> None:
    add_config_command(subcommands, "bench", "time a training step with deltatune and with HF PEFT side by side "
                       "(tokens/s, peak memory, TFLOP/s, ratio); writes JSON, a table and a plot", BenchConfig,
                       lambda cfg: _exit_code(run_bench(cfg)))
