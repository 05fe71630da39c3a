"""``deltatune compare``: train several methods on the same job with the same step budget and
tabulate what each cost and what it bought.

Each method runs as its own ``deltatune train`` process, so its peak memory (the process's
maximum resident set on CPU, ``torch.cuda.max_memory_allocated`` on GPU, as the run's summary
reports it) and time are its own. The table has trainable parameters, adapter file size,
peak memory, training time, validation loss before → after, and the held-out generation
metrics of the final evaluation (exact match and ROUGE-L against the validation answers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomically, write_text_atomically
from .options import add_config_command

DEFAULT_METHODS = ["lora", "dora", "loha", "lokr", "adalora", "ia3", "vera", "nola", "bottleneck", "pfeiffer",
                   "prompt_tuning", "prefix_tuning", "p_tuning", "top_layers"]


@dataclass
class CompareConfig:
    """Settings of a comparison run."""

    methods: list = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Methods to train (names as for deltatune train --method)."""
    max_steps: int = 60
    """Optimizer steps per method (the default job's budget)."""
    model: str = ""
    """Base model folder; empty: the embedded default model."""
    data: str = ""
    """Training data; empty: the default job's data (validation on its held-out file)."""
    output_dir: str = ""
    """Folder for the runs and the table; empty: runs/compare-<time>."""
    batch_size: int = 0
    """Examples per step for every run; 0: the train default."""
    lr: float = 0.0
    """Learning rate for every run; 0: each method's usual rate (its recipe)."""
    eval_steps: int = 0
    """Validation-loss evaluation every N steps in each run, besides step 0; 0: only at step 0 and the end, the two the table reads."""


def _train_command(cfg: CompareConfig, method: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "deltatune", "train", "--method", method, "--output-dir", str(out),
           "--max-steps", str(cfg.max_steps), "--final-eval", "on", "--overwrite"]
    if cfg.model:
        cmd += ["--model", cfg.model]
    if cfg.data:
        cmd += ["--data", cfg.data]
    if cfg.batch_size:
        cmd += ["--batch-size", str(cfg.batch_size)]
    if cfg.lr:
        cmd += ["--lr", str(cfg.lr)]
    # an explicit spacing keeps the pass at step 0, the "before" of the table, whatever it costs
    cmd += ["--eval-steps", str(cfg.eval_steps or cfg.max_steps)]
    return cmd


def _run_one(cfg: CompareConfig, method: str, out: Path, log) -> dict:
    started = time.perf_counter()
    with open(out.parent / f"{method}.log", "w") as stream:
        proc = subprocess.Popen(_train_command(cfg, method, out), stdout=stream, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (out.parent / f"{method}.log").read_text().strip().splitlines()[-1:] or ["?"]
        log(f"{method}: failed ({tail[0]})")
        return {"method": method, "error": tail[0]}
    summary = json.loads((out / "summary.json").read_text())
    tuned = {k: v for k, v in summary.get("evaluation", {}).items() if k != "base"}
    scores = next(iter(tuned.values()), {})
    row = {
        "method": method,
        "trainable_parameters": summary["trainable_parameters"],
        "adapter_bytes": (out / "adapter" / "adapter_model.safetensors").stat().st_size,
        "peak_memory_mib": summary["peak_memory_mib"],
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "train_seconds": summary["seconds"],
        "wall_seconds": wall,
        "validation_loss_before": summary["initial_validation_loss"],
        "validation_loss_after": summary["final_validation_loss"],
        "exact_match": scores.get("exact_match"),
        "rougeL": scores.get("rougeL"),
        "base_exact_match": summary.get("evaluation", {}).get("base", {}).get("exact_match"),
        "evaluation_split": summary.get("evaluation_split"),
        # times mean little if something else shared the cores: the load when the run ended
        "load_average_1m": os.getloadavg()[0],
    }
    log(f"{method}: {row['trainable_parameters']:,d} trainable, val loss {row['validation_loss_before']:.3f} -> "
        f"{row['validation_loss_after']:.3f}, exact match {row['exact_match']}, {row['train_seconds']:.0f} s")
    return row


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | trainable params | adapter file | peak memory (MiB) | time (s) | val loss before → after "
            "| held-out exact match | ROUGE-L |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | – | – | – | – | failed: {r['error']} | – | – |")
            continue
        size = r["adapter_bytes"]
        size_text = f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"
        em = "–" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
        rl = "–" if r["rougeL"] is None else f"{r['rougeL']:.3f}"
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,d} | {size_text} | {r['peak_memory_mib']:.0f} "
                     f"| {r['train_seconds']:.0f} | {r['validation_loss_before']:.3f} → "
                     f"{r['validation_loss_after']:.3f} | {em} | {rl} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in done:
        left.scatter(r["trainable_parameters"], r["validation_loss_after"])
        left.annotate(r["method"], (r["trainable_parameters"], r["validation_loss_after"]), fontsize=8)
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (log)")
    left.set_ylabel("validation loss after training")
    names = [r["method"] for r in done]
    right.barh(names, [r["exact_match"] or 0 for r in done])
    right.set_xlabel("held-out exact match")
    fig.tight_layout()
    write_atomically(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def run_compare(cfg: CompareConfig, log=print) -> list[dict]:
    """Train every method in ``cfg.methods``; write compare.json, compare.md and compare.png."""
    from ..train.methods import RECIPES

    unknown = [m for m in cfg.methods if m not in RECIPES]
    if unknown:
        from ..train import ConfigError

        raise ConfigError(f"methods: {unknown} are not known; choose from {sorted(RECIPES)}")
    for name in ("max_steps", "batch_size", "eval_steps"):
        if getattr(cfg, name) < (1 if name == "max_steps" else 0):
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} is too small")
    folder = Path(cfg.output_dir or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for method in cfg.methods:
        rows.append(_run_one(cfg, method, folder / method, log))
        write_text_atomically(folder / "compare.json", json.dumps(rows, indent=2))  # partial results survive a stop
    table = markdown_table(rows)
    write_text_atomically(folder / "compare.md", table)
    plot(rows, folder / "compare.png")
    log("\n" + table + f"\nwritten to {folder}")
    return rows


def add_parser(subcommands) -> None:
    add_config_command(subcommands, "compare", "train several methods on the same job and step budget; one table "
                       "of parameters, file size, memory, time and held-out scores, plus a plot", CompareConfig,
                       lambda cfg: 0 if all("error" not in r for r in run_compare(cfg)) else 1)
