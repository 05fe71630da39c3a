"""The sweep behind `deltatune train`'s defaults: settings tried on the benchmark tasks' training and
validation splits (never their test splits), scored by the final validation loss and timed.

Each setting is one `deltatune train` run with the task's train file and its validation file;
on each task the choice is the lowest validation loss among the settings that train within 0.7
of the plain PEFT loop's time (docs/training.md explains the choice and the rule that gives it). Writes `benchmarks/sweep-defaults-cpu.json`
and a plot of validation loss against training seconds.

    python benchmarks/sweep_defaults.py                  # about 40 minutes on 2 CPU cores
    python benchmarks/sweep_defaults.py --small --model DIR   # a smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from quality_tasks import task_files  # noqa: E402

# name -> flags; every swept setting is given explicitly, so changing a default never changes a row
BEFORE = {"batch-size": 8, "lr": 2e-4, "schedule": "cosine", "epochs": 3, "warmup-ratio": 0, "group-by-length": False,
          "lora-plus-ratio": 0}
ONE_EPOCH = {**BEFORE, "epochs": 1, "warmup-ratio": 0.1, "group-by-length": True}
SETTINGS = {
    "before: b8 lr2e-4 cosine 3 epochs": BEFORE,
    "b8 lr2e-4 cosine 1 epoch": {**BEFORE, "epochs": 1},
    "b8 lr1e-3 cosine": {**ONE_EPOCH, "lr": 1e-3},
    "b8 lr2e-3 cosine": {**ONE_EPOCH, "lr": 2e-3},
    "b4 lr5e-4 cosine": {**ONE_EPOCH, "batch-size": 4, "lr": 5e-4},
    "b4 lr1e-3 cosine": {**ONE_EPOCH, "batch-size": 4, "lr": 1e-3},
    "b8 lr1e-3 wsd": {**ONE_EPOCH, "lr": 1e-3, "schedule": "wsd"},
    "b8 lr1e-3 constant": {**ONE_EPOCH, "lr": 1e-3, "schedule": "constant"},
    "b8 lr2e-4 LoRA+ 16": {**ONE_EPOCH, "lora-plus-ratio": 16},
    "b8 lr1e-3 cosine 2 epochs": {**ONE_EPOCH, "lr": 1e-3, "epochs": 2},
    "b8 lr1e-3 cosine ungrouped": {**ONE_EPOCH, "lr": 1e-3, "group-by-length": False},
    "b8 lr1e-3 constant 2 epochs": {**ONE_EPOCH, "lr": 1e-3, "schedule": "constant", "epochs": 2},
    "b8 lr1e-3 constant 3 epochs": {**ONE_EPOCH, "lr": 1e-3, "schedule": "constant", "epochs": 3},
    "b8 lr1e-3 cosine 3 epochs": {**ONE_EPOCH, "lr": 1e-3, "epochs": 3},
    "b4 lr1e-3 constant 3 epochs": {**ONE_EPOCH, "batch-size": 4, "lr": 1e-3, "schedule": "constant", "epochs": 3},
}
# the docstring task's steps take about three times the default job's on 2 CPU cores: the
# settings the default job already ruled out, and the slow 3-epoch run, are not repeated there
SKIP = {"docstrings": {"before: b8 lr2e-4 cosine 3 epochs", "b8 lr2e-4 cosine 1 epoch", "b4 lr5e-4 cosine",
                       "b8 lr1e-3 wsd", "b8 lr1e-3 cosine 2 epochs", "b8 lr1e-3 cosine ungrouped",
                       "b8 lr1e-3 constant 3 epochs", "b8 lr1e-3 cosine 3 epochs", "b4 lr1e-3 constant 3 epochs"}}


def flags(setting: dict) -> list[str]:
    """Command-line flags for ``setting`` (booleans as --x / --no-x)."""
    out = []
    for key, value in setting.items():
        out += [f"--{key}" if value else f"--no-{key}"] if isinstance(value, bool) else [f"--{key}", str(value)]
    return out


def run(task: str, name: str, setting: dict, files: dict, out: Path, model: str, small: bool) -> dict:
    folder = out / task / name.replace(" ", "_").replace(":", "")
    extra = ["--max-steps", "2"] if small else []
    command = [sys.executable, "-m", "deltatune", "train", "--data.path", str(files["train"]),
               "--data.validation-path", str(files["validation"]), "--final-eval", "off",
               *(["--model", model] if model else []), *flags(setting), *extra,
               "--output-dir", str(folder), "--overwrite"]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    summary = json.loads((folder / "summary.json").read_text())
    seconds = summary["time_seconds"]
    return {"task": task, "name": name, "setting": setting, "steps": summary["steps"],
            "validation_loss": summary["final_validation_loss"], "best_validation_loss": summary["best_validation_loss"],
            "train_seconds": seconds["total"] - seconds.get("final_evaluation", 0.0),
            "steps_seconds": seconds["steps"], "padding_share": summary["padding_share"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        ax.scatter([r["train_seconds"] for r in mine], [r["validation_loss"] for r in mine])
        for r in mine:
            ax.annotate(r["name"], (r["train_seconds"], r["validation_loss"]), fontsize=7)
        ax.set(title=f"{task}: validation loss after training", xlabel="training wall seconds",
               ylabel="validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="default,docstrings")
    parser.add_argument("--model", default="")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "sweep")
    parser.add_argument("--out", type=Path, default=HERE / "sweep-defaults-cpu.json")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out (other tasks)")
    parser.add_argument("--only", default="", help="comma-separated setting names to run (default: all)")
    args = parser.parse_args()
    rows = json.loads(args.out.read_text()) if args.append else []
    for task in args.tasks.split(","):
        files = task_files(task, args.work, args.small)
        names = [name for name in SETTINGS if name not in SKIP.get(task, ())
                 and (not args.only or name in args.only.split(","))]
        for name in names[:1] if args.small else names:  # --small: one setting, to check the script
            setting = SETTINGS[name]
            rows.append(run(task, name, setting, files, args.work, args.model, args.small))
            args.out.write_text(json.dumps(rows, indent=2))
            print(json.dumps(rows[-1]), flush=True)
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
