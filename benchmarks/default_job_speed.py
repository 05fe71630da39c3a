"""The default job's wall time now against an earlier revision, on the same machine, one after
the other: `deltatune train` with no arguments, run from this checkout and from a git revision
(checked out into a temporary worktree and run with its own sources, with this checkout's
installed dependencies). Writes `benchmarks/default-job-speed-cpu.json` with, for each: the
run's loading + training seconds, validation loss before and after, and the test split's
exact match and ROUGE-L; prints the ratio. The run folders stay in `runs/default-job-speed/`
(`python benchmarks/default_job.py --run runs/default-job-speed/after` records the new run
as the default job's figures).

    python benchmarks/default_job_speed.py --before f424d24      # about ten minutes on 2 cores
    python benchmarks/default_job_speed.py --before 08da1e7 --train-args="--quantize nf4" \
        --out benchmarks/default-job-speed-nf4-cpu.json          # the same job on a 4-bit base
    python benchmarks/default_job_speed.py --before HEAD --before-args="--precision fp32" \
        --out benchmarks/default-job-speed-precision-cpu.json    # precision auto against float32
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent


def run_job(src: Path, out: Path, train_args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deltatune", "train", *train_args, "--output-dir", str(out), "--overwrite"],
                   check=True, env=env, cwd=src.parent, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    tuned = summary["evaluation"]["default"]
    return {"wall_seconds": wall, "train_seconds": summary["seconds"],
            "validation_loss_before": summary["initial_validation_loss"],
            "validation_loss_after": summary["final_validation_loss"], "evaluation_split": summary["evaluation_split"],
            "exact_match": tuned["exact_match"], "rougeL": tuned["rougeL"], "precision": summary.get("precision")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier git revision")
    parser.add_argument("--out", type=Path, default=HERE / "default-job-speed-cpu.json")
    parser.add_argument("--train-args", default="", help="arguments added to `deltatune train` in both runs")
    parser.add_argument("--before-args", default="", help="arguments added to the earlier revision's run only")
    args = parser.parse_args()
    train_args = shlex.split(args.train_args)
    revision = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    now = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    runs = (ROOT / "runs" / ("default-job-speed" + "".join("-" + a.strip("-") for a in train_args))).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            before = run_job(tree / "src", runs / "before", train_args + shlex.split(args.before_args))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
        after = run_job(ROOT / "src", runs / "after", train_args)
    sys.path.insert(0, str(HERE))
    from default_job import machine
    from tables import default_job_speed_table

    result = {"machine": machine(), "train_args": args.train_args, "before_args": args.before_args,
              "before": {"revision": revision, **before}, "after": {"revision": now, **after},
              "speedup": before["train_seconds"] / after["train_seconds"]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(default_job_speed_table(result))


if __name__ == "__main__":
    main()
