"""The default job's figures: `deltatune train` with no arguments, recorded as JSON.

Runs the default job (LoRA on the embedded model and the Velmar data) in a fresh folder, or
reads a finished run of it (`--run DIR`, e.g. the one `.ci/run` leaves in `runs/`), and writes
`benchmarks/default-job-cpu.json`: validation loss before and after training (validation
split), the final evaluation base against tuned (test split: animals in neither training nor
validation, which no setting was chosen on), wall times and the machine. Prints the table the
docs show (`benchmarks/tables.py` renders it from the JSON).

    python benchmarks/default_job.py                  # runs the job (about five minutes on 2 cores)
    python benchmarks/default_job.py --run runs/train-20261130-083000
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

import yaml

HERE = Path(__file__).parent


def record(run: Path, wall_seconds: float | None) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    if not str(config["data"]["path"]).endswith("datasets/velmar/train.jsonl") or config["method"] != "lora":
        raise SystemExit(f"{run} is not a run of the default job (data {config['data']['path']}, "
                         f"method {config['method']})")
    keep = ("trainable_parameters", "total_parameters", "steps", "seconds", "precision", "peak_memory_mib",
            "train_examples", "validation_examples", "initial_validation_loss", "final_validation_loss",
            "evaluation_split", "evaluation")
    return {"machine": machine(), "wall_seconds": wall_seconds, **{k: summary.get(k) for k in keep}}


def machine() -> dict:
    """The processor (its model name where /proc/cpuinfo gives one) and CPU count a figure was measured on."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return {"processor": name, "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run folder of the default job")
    parser.add_argument("--out", type=Path, default=HERE / "default-job-cpu.json")
    args = parser.parse_args()
    wall = None
    run = args.run
    if run is None:
        run = Path("runs") / f"default-job-{time.strftime('%Y%m%d-%H%M%S')}"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "deltatune", "train", "--output-dir", str(run)], check=True)
        wall = time.perf_counter() - started
    result = record(run, wall)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.path.insert(0, str(HERE))
    from tables import default_job_table

    print(default_job_table(result))


if __name__ == "__main__":
    main()
