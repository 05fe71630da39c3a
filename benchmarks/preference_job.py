"""The default preference jobs' figures: `deltatune train --objective dpo` and `--objective orpo`.

Runs each default preference job (LoRA on the embedded model and the shipped Velmar preference
pairs, src/deltatune/datasets/velmar_pairs) in a fresh folder and writes
`benchmarks/preference-job-cpu.json`: held-out preference accuracy (the share of test pairs whose
chosen answer the model finds more likely than the rejected one, summed log-probabilities) of the
base and of the tuned model, the tuned model's reward accuracy on the test pairs, the validation
figures, wall times and the machine. The test split asks about animals that neither the training
nor the validation pairs mention, and no setting was chosen on it.

`--sweep` runs the settings the defaults were chosen from, on the training and validation splits
only (no final evaluation), and writes `benchmarks/preference-sweep-cpu.json`.

    python benchmarks/preference_job.py            # both default jobs (a few minutes each on 2 cores)
    python benchmarks/preference_job.py --sweep    # the validation sweep behind the defaults
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> flags (each swept setting given explicitly, so a later change of default changes no row)
SWEEP = {
    "dpo lr5e-4 beta0.1": ["--objective", "dpo", "--epochs", "1", "--lr", "5e-4", "--beta", "0.1"],
    "dpo lr1e-3 beta0.1": ["--objective", "dpo", "--epochs", "1", "--lr", "1e-3", "--beta", "0.1"],
    "dpo lr2e-3 beta0.1": ["--objective", "dpo", "--epochs", "1", "--lr", "2e-3", "--beta", "0.1"],
    "dpo lr1e-3 beta0.5": ["--objective", "dpo", "--epochs", "1", "--lr", "1e-3", "--beta", "0.5"],
    "orpo lr1e-3 lambda0.1": ["--objective", "orpo", "--epochs", "1", "--lr", "1e-3", "--orpo-lambda", "0.1"],
    "orpo lr2e-3 lambda0.1": ["--objective", "orpo", "--epochs", "1", "--lr", "2e-3", "--orpo-lambda", "0.1"],
    "orpo lr1e-3 lambda0.5": ["--objective", "orpo", "--epochs", "1", "--lr", "1e-3", "--orpo-lambda", "0.5"],
}
SUMMARY_KEYS = ("objective", "trainable_parameters", "total_parameters", "steps", "seconds", "peak_memory_mib",
                "train_examples", "validation_examples", "initial_validation_loss", "final_validation_loss",
                "evaluation_split", "evaluation", "time_seconds")


def machine() -> dict:
    """The processor, CPU count and load a figure was measured under."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    return {"processor": platform.processor() or platform.machine(), "model": model, "cpus": os.cpu_count(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def run(out: Path, flags: list[str]) -> tuple[dict, list[dict], float]:
    """One `deltatune train` run, as a user types it: (summary, metrics rows, wall seconds)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deltatune", "train", *flags, "--output-dir", str(out), "--overwrite"],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((out / "summary.json").read_text()), rows, wall


def validation(rows: list[dict]) -> dict:
    """The first and last validation pass of a run."""
    evals = [r for r in rows if "eval_loss" in r]
    keys = ("step", "eval_loss", "eval_preference_accuracy", "eval_reward_accuracy", "eval_reward_margin")
    return {"first": {k: evals[0].get(k) for k in keys}, "last": {k: evals[-1].get(k) for k in keys}}


def default_jobs(folder: Path) -> dict:
    jobs = {}
    for objective in ("dpo", "orpo"):
        command = ["--objective", objective]
        summary, rows, wall = run(folder / f"{objective}-default", command)
        jobs[objective] = {"command": "deltatune train " + " ".join(command), "wall_seconds": round(wall, 1),
                           **{k: summary.get(k) for k in SUMMARY_KEYS}, "validation": validation(rows)}
        report = summary["evaluation"]
        print(f"{objective}: held-out preference accuracy {report['preference_accuracy_before']:.3f} -> "
              f"{report['preference_accuracy_after']:.3f}, reward accuracy {report['reward_accuracy']:.3f}, "
              f"{wall:.0f} s", flush=True)
    return jobs


def sweep(folder: Path) -> list[dict]:
    rows = []
    for name, flags in SWEEP.items():
        summary, metrics, wall = run(folder / name.replace(" ", "_"), [*flags, "--final-eval", "off"])
        row = {"name": name, "flags": flags, "steps": summary["steps"], "wall_seconds": round(wall, 1),
               "steps_seconds": summary["time_seconds"]["steps"], **validation(metrics)}
        last = row["last"]
        print(f"{name}: validation preference accuracy {last['eval_preference_accuracy']:.3f}, reward accuracy "
              f"{last['eval_reward_accuracy']:.3f}, loss {last['eval_loss']:.4f}, {wall:.0f} s", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="the validation sweep behind the defaults")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "preference-job")
    parser.add_argument("--out", type=Path, help="the JSON file to write")
    args = parser.parse_args()
    result = {"machine": machine()}
    if args.sweep:
        result["sweep"] = sweep(args.runs / "sweep")
        out = args.out or HERE / "preference-sweep-cpu.json"
    else:
        result["jobs"] = default_jobs(args.runs)
        out = args.out or HERE / "preference-job-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
