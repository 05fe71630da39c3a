"""Time to quality: `deltatune train` against a plain transformers + HF PEFT loop, side by side.

For each task (the default job; code summarization built from the installed standard library,
see quality_tasks.py) three runs, each in its own process, one after the other on this machine:

- ``loop``: the plain loop of quality_loop.py (LoRA r=16/alpha 32/dropout 0.05 on all linear
  layers, float32, AdamW at a constant 2e-4, batch 4, a fixed number of steps, no validation);
- ``deltatune_loop_settings``: `deltatune train` at the loop's settings (same steps, batch,
  schedule and rate, no validation);
- ``deltatune_defaults``: `deltatune train` as a user first runs it (only the data given).

Then quality_score.py scores every adapter, and the untouched base, on the test split with one
scorer. Writes the table's JSON: wall time (whole process) and its split into load, data, steps,
validation, checkpoints and final evaluation, peak memory (max RSS; on CPU), padding share,
held-out ROUGE-L and exact match (test split), the loss on the validation split (what the
defaults are chosen by), and the ratios the targets are stated in.

    python benchmarks/quality.py                        # both tasks, about an hour on 2 CPU cores
    python benchmarks/quality.py --tasks docstrings --out benchmarks/quality-cpu.json
    python benchmarks/quality.py --small --model DIR    # a smoke test with a tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from quality_tasks import task_files  # noqa: E402

# per task: the loop's optimizer steps (the default job: its 3 epochs at batch 4; docstrings: about
# one epoch, as in the trial) and the tokens generated per test prompt
TASKS = {"default": {"steps": 120, "max_new_tokens": 32}, "docstrings": {"steps": 80, "max_new_tokens": 48}}
LOOP_SETTINGS = ["--batch-size", "4", "--schedule", "constant", "--lr", "2e-4", "--warmup-steps", "0",
                 "--warmup-ratio", "0", "--no-group-by-length", "--data.validation-fraction", "0",
                 "--final-eval", "off", "--data.max-seq-len", "512"]


def _run(command: list[str], log: Path) -> float:
    """Run ``command`` (output to ``log``); its wall time in seconds."""
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])})
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - started


def _deltatune(args: list[str], out: Path, model: str, log: Path) -> dict:
    model_args = ["--model", model] if model else []
    wall = _run([sys.executable, "-m", "deltatune", "train", *model_args, *args, "--output-dir", str(out),
                 "--overwrite"], log)
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_seconds": wall, "time_seconds": summary["time_seconds"], "steps": summary["steps"],
            "peak_memory_mib": summary["peak_memory_mib"], "padding_share": summary["padding_share"],
            "final_train_loss": summary["final_train_loss"], "adapter": summary["adapter"], "command": args}


def run_task(task: str, out: Path, model: str, small: bool, defaults_args: list[str]) -> dict:
    (out / task).mkdir(parents=True, exist_ok=True)
    files = task_files(task, out, small)
    settings = TASKS[task]
    steps = 2 if small else settings["steps"]
    model_dir = model or _default_model_dir()
    runs = {}
    loop_out = out / task / "loop"
    wall = _run([sys.executable, str(HERE / "quality_loop.py"), "--model", model_dir, "--train", str(files["train"]),
                 "--steps", str(steps), "--out", str(loop_out)], out / f"{task}-loop.log")
    runs["loop"] = {**json.loads((loop_out / "result.json").read_text()), "wall_seconds": wall}
    data = ["--data.path", str(files["train"])]
    runs["deltatune_loop_settings"] = _deltatune(data + LOOP_SETTINGS + ["--max-steps", str(steps)],
                                                 out / task / "deltatune-loop-settings", model,
                                                 out / f"{task}-deltatune-loop-settings.log")
    # the default job is `deltatune train` without arguments; another task gives its files
    user_args = [] if task == "default" else data + ["--data.validation-path", str(files["validation"])]
    if small:
        user_args += ["--max-steps", "3"]
    runs["deltatune_defaults"] = _deltatune(user_args + defaults_args, out / task / "deltatune-defaults", model,
                                            out / f"{task}-deltatune-defaults.log")
    result = {"task": task, "loop_steps": steps, "runs": runs}
    return score_task(result, files, out, model_dir, 4 if small else settings["max_new_tokens"])


def score_task(result: dict, files: dict, out: Path, model_dir: str, max_new_tokens: int) -> dict:
    """Score every adapter of ``result["runs"]`` and the base on the test split (in place); the ratios."""
    task, runs = result["task"], result["runs"]
    scores_file = out / f"{task}-scores.json"
    adapters = [f"{name}={run['adapter']}" for name, run in runs.items()]
    _run([sys.executable, str(HERE / "quality_score.py"), "--model", model_dir, "--test", str(files["test"]),
          *[arg for a in adapters for arg in ("--adapter", a)], "--validation", str(files["validation"]),
          "--max-new-tokens", str(max_new_tokens), "--out", str(scores_file)], out / f"{task}-score.log")
    scores = json.loads(scores_file.read_text())
    for name, run in runs.items():
        run["score"] = {k: scores[name][k] for k in ("rougeL", "exact_match", "validation_loss", "rougeL_each")}
    result["base_score"] = {k: scores["base"][k] for k in ("rougeL", "exact_match", "validation_loss")}
    result["ratios"] = ratios(runs)
    return result


def paired_bootstrap(ours: list[float], theirs: list[float], resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(ours - theirs) over test examples resampled with replacement: how far
    a difference in ROUGE-L between two adapters on the same few examples can move by chance."""
    rng = random.Random(seed)
    diffs = [a - b for a, b in zip(ours, theirs)]
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def training_seconds(run: dict) -> float:
    """A run's wall time without a final generation-based evaluation (the loop has none)."""
    return run["wall_seconds"] - run["time_seconds"].get("final_evaluation", 0.0)


def ratios(runs: dict) -> dict:
    loop, same, defaults = runs["loop"], runs["deltatune_loop_settings"], runs["deltatune_defaults"]
    each = [r["score"].get("rougeL_each") for r in (defaults, loop)]
    noise = {"defaults_score_minus_loop_ci95": paired_bootstrap(*each)} if all(each) else {}
    return {**noise, "defaults_time_over_loop": training_seconds(defaults) / loop["wall_seconds"],
            "defaults_score_minus_loop": defaults["score"]["rougeL"] - loop["score"]["rougeL"],
            "loop_settings_step_speedup": loop["time_seconds"]["steps"] / same["time_seconds"]["steps"],
            "loop_settings_wall_speedup": loop["wall_seconds"] / same["wall_seconds"],
            "loop_settings_memory_over_loop": same["peak_memory_mib"] / loop["peak_memory_mib"]}


def _default_model_dir() -> str:
    from deltatune.loading import default_model_dir
    return str(default_model_dir())


def versions() -> dict:
    import peft
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="default,docstrings")
    parser.add_argument("--model", default="", help="a Hugging Face folder; empty: the embedded default model")
    parser.add_argument("--small", action="store_true", help="tiny sizes: checks the script, times nothing")
    parser.add_argument("--defaults-args", default="", help="flags added to the deltatune_defaults run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--out", type=Path, default=HERE / "quality-cpu.json")
    parser.add_argument("--rescore", action="store_true",
                        help="train nothing: score the adapters --out records for --tasks again (they must still be "
                             "under --work), and update their scores and ratios in --out")
    args = parser.parse_args()
    if args.rescore:
        rescore(args)
        return
    import torch
    from deltatune.bench.run import device_name
    results = {"machine": {"processor": platform.machine(), "name": device_name("cpu"), "cpus": os.cpu_count(),
                           "threads": torch.get_num_threads()},
               "versions": versions(), "tasks": []}
    for task in args.tasks.split(","):
        results["tasks"].append(run_task(task, args.work, args.model, args.small, shlex.split(args.defaults_args)))
        args.out.write_text(json.dumps(results, indent=2))  # a finished task is kept if a later one fails
    for t in results["tasks"]:
        print(t["task"], json.dumps(t["ratios"]), {n: r["score"]["rougeL"] for n, r in t["runs"].items()})


def rescore(args) -> None:
    """``--rescore``: the recorded runs' adapters scored again (the times stay as recorded)."""
    results = json.loads(args.out.read_text())
    model_dir = args.model or _default_model_dir()
    for task in args.tasks.split(","):
        entry = next(t for t in results["tasks"] if t["task"] == task)
        files = task_files(task, args.work, args.small)
        score_task(entry, files, args.work, model_dir, 4 if args.small else TASKS[task]["max_new_tokens"])
        entry["rescored"] = time.strftime("%Y-%m-%d")
        args.out.write_text(json.dumps(results, indent=2))
        print(task, json.dumps(entry["ratios"]))


if __name__ == "__main__":
    main()
