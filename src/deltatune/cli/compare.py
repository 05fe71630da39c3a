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
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..files import write_atomically, write_text_atomically
from .lr_search import search_rate
from .options import add_config_command

DEFAULT_METHODS = ["lora", "dora", "loha", "lokr", "adalora", "ia3", "vera", "nola", "bottleneck", "pfeiffer",
                   "prompt_tuning", "prefix_tuning", "p_tuning", "top_layers"]
# recipes that need settings only the user can give (which tokens, which LoRA experts): never in a group
NEEDS_OPTIONS = ("trainable_tokens", "xlora")


def recipe_of(method: str) -> str:
    """The recipe a compared method runs: ``lora@eva`` (a labelled variant, its settings in
    ``method_options``) runs ``lora``."""
    return method.partition("@")[0]


def method_group(name: str, given_options: frozenset = frozenset()) -> list[str]:
    """The methods a group name stands for: ``classic`` (the default list), ``catalogue`` (every
    other recipe that runs on its own, or with its settings in ``given_options``) or ``all``; a plain
    method name stands for itself."""
    from ..train.methods import RECIPES

    runnable = [m for m in RECIPES if m not in NEEDS_OPTIONS or m in given_options]
    groups = {"classic": list(DEFAULT_METHODS), "catalogue": [m for m in runnable if m not in DEFAULT_METHODS],
              "all": runnable}
    return groups.get(name, [name])


@dataclass
class CompareConfig:
    """Settings of a comparison run."""

    methods: list = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Methods to train (names as for deltatune train --method, or NAME@LABEL: a variant of NAME whose settings --method-options gives under that key, a row of its own), or a group: classic (the default), catalogue (the other methods), all."""
    max_steps: int = 60
    """Optimizer steps per method (the default job's budget)."""
    model: str = ""
    """Base model folder; empty: the embedded default model."""
    data: str = ""
    """Training data; empty: the default job's data (validation on its held-out file)."""
    test_data: str = ""
    """Test file for every run's final evaluation (empty: the default job's test file, or with --data the validation records)."""
    output_dir: str = ""
    """Folder for the runs and the table; empty: runs/compare-<time>."""
    batch_size: int = 0
    """Examples per step for every run; 0: the train default."""
    lr: float = 0.0
    """Learning rate for every run; 0: each method's usual rate (its recipe)."""
    eval_steps: int = 0
    """Validation-loss evaluation every N steps in each run, besides step 0; 0: only at step 0 and the end, the two the table reads."""
    lr_search: float = 0.0
    """Choose each method's learning rate on validation data: train at its recipe's rate and at this factor times it, then step by the factor in the better direction while the validation loss after training falls; only the chosen rate's adapter is scored on the test file. 0: each method at its recipe's rate (or --lr)."""
    lr_search_tries: int = 4
    """With --lr-search: the most rates tried per method."""
    method_options: dict = field(default_factory=dict)
    """Config fields per method, given to its runs as train's --adapter, e.g. '{trainable_tokens: {token_indices: [1, 2]}, xlora: {adapters: {a: DIR, b: DIR}}, lora@eva: {init_lora_weights: eva}}'; the groups include trainable_tokens and xlora only when given here."""


def _train_command(cfg: CompareConfig, method: str, out: Path, lr: float = 0.0, final_eval: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "deltatune", "train", "--method", recipe_of(method), "--output-dir", str(out),
           "--max-steps", str(cfg.max_steps), "--final-eval", "on" if final_eval else "off", "--overwrite"]
    if cfg.model:
        cmd += ["--model", cfg.model]
    if cfg.data:
        cmd += ["--data", cfg.data]
    if cfg.test_data:
        cmd += ["--data.test-path", cfg.test_data]
    if cfg.batch_size:
        cmd += ["--batch-size", str(cfg.batch_size)]
    if lr or cfg.lr:
        cmd += ["--lr", str(lr or cfg.lr)]
    if cfg.method_options.get(method):
        cmd += ["--adapter", json.dumps(cfg.method_options[method])]  # JSON is YAML
    # an explicit spacing keeps the pass at step 0, the "before" of the table, whatever it costs
    cmd += ["--eval-steps", str(cfg.eval_steps or cfg.max_steps)]
    return cmd


def _run_process(cmd: list[str], log_path: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak resident MiB) of ``cmd``, its output in ``log_path``."""
    started = time.perf_counter()
    with open(log_path, "w") as stream:
        proc = subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    with open(log_path, "a") as stream:  # CPU time beside wall time: a busy machine shows as wall >> CPU / threads
        stream.write(f"\ncompare: {wall:.1f} s wall, {usage.ru_utime + usage.ru_stime:.1f} s CPU, "
                     f"load {os.getloadavg()[0]:.2f}\n")
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024


def _last_line(log_path: Path) -> str:
    """The run's last line of output (its error, when it failed), not compare's own time line."""
    lines = [line for line in log_path.read_text().splitlines() if line.strip() and not line.startswith("compare: ")]
    return (lines[-1:] or ["?"])[0]


def failure_reason(line: str) -> str:
    """Why a run failed, from its last line: the text after the CLI's ``error:`` prefix
    (``deltatune train: error: WHY`` gives ``WHY``), or the whole line when it has none."""
    return line.split("error: ", 1)[1] if "error: " in line else line


def _row(method: str, out: Path, summary: dict, evaluation: dict, wall: Optional[float],
         rss: Optional[float]) -> dict:
    tuned = {k: v for k, v in evaluation.items() if k != "base"}
    scores = next(iter(tuned.values()), {})
    return {
        "method": method,
        "trainable_parameters": summary["trainable_parameters"],
        "adapter_bytes": (out / "adapter" / "adapter_model.safetensors").stat().st_size,
        "peak_memory_mib": summary["peak_memory_mib"],
        "peak_rss_mib": rss,
        "train_seconds": summary["seconds"],
        "wall_seconds": wall,
        "validation_loss_before": summary["initial_validation_loss"],
        "validation_loss_after": summary["final_validation_loss"],
        "exact_match": scores.get("exact_match"),
        "rougeL": scores.get("rougeL"),
        "base_exact_match": evaluation.get("base", {}).get("exact_match"),
        "evaluation_split": summary.get("evaluation_split"),
        # times mean little if something else shared the cores: the load when the run ended
        "load_average_1m": os.getloadavg()[0],
    }


def _log_row(row: dict, log) -> None:
    log(f"{row['method']}: {row['trainable_parameters']:,d} trainable, val loss {row['validation_loss_before']:.3f} -> "
        f"{row['validation_loss_after']:.3f}, exact match {row['exact_match']}, {row['train_seconds']:.0f} s")


def _run_one(cfg: CompareConfig, method: str, out: Path, log) -> dict:
    log_path = out.parent / f"{method}.log"
    code, wall, rss = _run_process(_train_command(cfg, method, out), log_path)
    if code != 0:
        line = _last_line(log_path)
        log(f"{method}: failed ({line})")
        return {"method": method, "error": line, "reason": failure_reason(line)}
    summary = json.loads((out / "summary.json").read_text())
    row = _row(method, out, summary, summary.get("evaluation", {}), wall, rss)
    _log_row(row, log)
    return row


def _saved_config(out: Path):
    """The ``TrainConfig`` a finished run in ``out`` wrote (defaults filled in as training read them)."""
    from ..train.config import load_config

    return load_config(str(out / "config.yaml"))


def _finished_run(cfg: CompareConfig, method: str, out: Path, lr: float) -> Optional[dict]:
    """The summary of a run already in ``out`` that this comparison would have made (a stopped
    comparison resumes without training it again); None when there is none."""
    if not (out / "summary.json").is_file() or not (out / "config.yaml").is_file():
        return None
    from ..train.loop import DEFAULT_DATA

    saved = _saved_config(out)
    same = (saved.method == recipe_of(method) and saved.lr == lr and saved.max_steps == cfg.max_steps
            and saved.model == cfg.model and saved.final_eval == "off"
            and (not cfg.batch_size or saved.batch_size == cfg.batch_size)
            and saved.adapter == (cfg.method_options.get(method) or {})
            and saved.data.path == (cfg.data or str(DEFAULT_DATA / "train.jsonl")))
    return json.loads((out / "summary.json").read_text()) if same else None


def _test_scores(out: Path, log_path: Path) -> tuple[dict, Optional[str], float]:
    """(``deltatune eval`` results, split, wall seconds) of the adapter trained in ``out``, on the
    run's test file, with the settings training's final evaluation uses; ({}, None, 0) when the run
    has none (its validation data chose the rate)."""
    from ..train.validation import eval_batch_size

    saved = _saved_config(out)
    if not saved.data.test_path:
        return {}, None, 0.0
    metrics, wall_file = out / "eval" / "metrics.json", out / "eval" / "compare-wall-seconds.txt"
    adapter = out / "adapter" / "adapter_model.safetensors"
    if metrics.is_file() and wall_file.is_file() and metrics.stat().st_mtime > adapter.stat().st_mtime:
        # a rerun of the comparison (more methods, more tries) scores an unchanged adapter once only
        return json.loads(metrics.read_text()), "test", float(wall_file.read_text())
    cmd = [sys.executable, "-m", "deltatune", "eval", "--adapter", str(out / "adapter"), "--data",
           saved.data.test_path, "--output-dir", str(out / "eval"), "--batch-size", str(eval_batch_size(saved)),
           "--max-new-tokens", str(saved.eval_max_new_tokens)]
    cmd += ["--model", saved.model] if saved.model else []
    cmd += ["--quantize", saved.quantize] if saved.quantize else []
    cmd += ["--chat-template"] if saved.data.chat_template else []
    code, wall, _ = _run_process(cmd, log_path)
    if code != 0:
        raise RuntimeError(f"deltatune eval of {out} failed: {_last_line(log_path)}")
    write_text_atomically(wall_file, f"{wall:.3f}\n")
    return json.loads(metrics.read_text()), "test", wall


def _searched_row(cfg: CompareConfig, method: str, folder: Path, log) -> dict:
    """A method's row at the rate its validation loss chose (``--lr-search``)."""
    from ..train.methods import RECIPES

    runs: dict[float, tuple[Path, dict, Optional[float], Optional[float]]] = {}
    failures: list[str] = []
    (folder / method).mkdir(parents=True, exist_ok=True)

    def validation_loss_at(lr: float) -> Optional[float]:
        out = folder / method / f"lr-{lr:g}"
        summary, wall, rss = _finished_run(cfg, method, out, lr), None, None
        if summary is None:
            log_path = folder / method / f"lr-{lr:g}.log"
            code, wall, rss = _run_process(_train_command(cfg, method, out, lr, final_eval=False), log_path)
            if code != 0:
                failures.append(_last_line(log_path))
                log(f"{method} at lr {lr:g}: failed ({failures[-1]})")
                return None
            summary = json.loads((out / "summary.json").read_text())
        runs[lr] = (out, summary, wall, rss)
        log(f"{method} at lr {lr:g}: validation loss {summary['final_validation_loss']}")
        return summary["final_validation_loss"]

    chosen, losses = search_rate(validation_loss_at, RECIPES[recipe_of(method)].lr, cfg.lr_search,
                                 cfg.lr_search_tries)
    if chosen not in runs:
        last = failures[-1] if failures else "no run"
        return {"method": method, "error": f"every rate tried failed ({last})", "reason": failure_reason(last),
                "validation_loss_by_lr": _by_lr(losses)}
    out, summary, wall, rss = runs[chosen]
    evaluation, split, eval_wall = _test_scores(out, folder / method / "eval.log")
    row = _row(method, out, {**summary, "evaluation_split": split}, evaluation,
               None if wall is None else wall + eval_wall, rss)
    row.update(lr=chosen, validation_loss_by_lr=_by_lr(losses))
    _log_row(row, log)
    return row


def _by_lr(losses: dict[float, float]) -> dict[str, Optional[float]]:
    return {f"{lr:g}": (None if math.isinf(loss) else loss) for lr, loss in sorted(losses.items())}


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table; with ``--lr-search`` a column gives each method's chosen rate."""
    searched = any("lr" in r for r in rows)
    columns = ["method", "trainable params", "adapter file", "peak memory (MiB)", "time (s)",
               "val loss before → after", "held-out exact match", "ROUGE-L"] + (["lr (chosen on validation)"]
                                                                               if searched else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lr = [f"{r['lr']:g}" if "lr" in r else "–"] if searched else []
        if "error" in r:
            lines.append("| " + " | ".join([r["method"], "–", "–", "–", "–", f"failed: {r['error']}", "–", "–"]
                                           + lr) + " |")
            continue
        size = r["adapter_bytes"]
        size_text = f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"
        em = "–" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
        rl = "–" if r["rougeL"] is None else f"{r['rougeL']:.3f}"
        cells = [r["method"], f"{r['trainable_parameters']:,d}", size_text, f"{r['peak_memory_mib']:.0f}",
                 f"{r['train_seconds']:.0f}",
                 f"{r['validation_loss_before']:.3f} → {r['validation_loss_after']:.3f}", em, rl] + lr
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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

    from ..train import ConfigError

    if not isinstance(cfg.method_options, dict) or any(not isinstance(v, dict) for v in cfg.method_options.values()):
        raise ConfigError(f"method_options: {cfg.method_options!r} is not a mapping of method names to config fields")
    cfg.methods = [m for name in cfg.methods for m in method_group(name, frozenset(cfg.method_options))]
    unknown = [m for m in cfg.methods + list(cfg.method_options) if recipe_of(m) not in RECIPES]
    if unknown:
        raise ConfigError(f"methods: {unknown} are not known; choose from {sorted(RECIPES)}")
    bare = [m for m in cfg.methods if "@" in m and not cfg.method_options.get(m)]
    if bare:
        raise ConfigError(f"methods: {bare[0]!r} is a variant (NAME@LABEL); give its settings with --method-options "
                          f"'{{{bare[0]}: {{...}}}}'")
    for name in ("max_steps", "batch_size", "eval_steps"):
        if getattr(cfg, name) < (1 if name == "max_steps" else 0):
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} is too small")
    if cfg.lr_search and cfg.lr:
        raise ValueError("--lr-search and --lr exclude each other: the search chooses the rate")
    folder = Path(cfg.output_dir or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for method in cfg.methods:
        rows.append(_searched_row(cfg, method, folder, log) if cfg.lr_search else
                    _run_one(cfg, method, folder / method, log))
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
