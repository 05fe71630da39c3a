"""Which precision the default job's steps run faster in on this CPU: `deltatune train` for a
few steps of the default job at `--precision fp32` and at `--precision bf16`, each in its own
process, alternating, and the CPU's bf16 feature flags beside the times. This is what
`precision: auto` is decided by on a CPU (`src/deltatune/hardware.py`), and it records what that
decision saw: the CPU's flags and its timed bf16 / float32 matmul speed-up.

    python benchmarks/cpu_precision.py                       # about five minutes on 2 cores
    python benchmarks/cpu_precision.py --out benchmarks/cpu-precision-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
PRECISIONS = ("fp32", "bf16")


def run(precision: str, steps: int, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "deltatune", "train", "--precision", precision, "--max-steps", str(steps),
                    "--eval-steps", str(10 * steps), "--final-eval", "off", "--output-dir", str(out), "--overwrite"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    seconds = summary["time_seconds"]
    return {"steps_seconds": seconds["steps"], "validation_seconds": seconds["validation"],
            "validation_passes": summary["validation_passes"], "peak_memory_mib": summary["peak_memory_mib"],
            "final_train_loss": summary["final_train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "cpu-precision")
    parser.add_argument("--out", type=Path, default=HERE / "cpu-precision-cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from deltatune.bench.run import device_name
    from deltatune.hardware import auto_precision, bf16_matmul_speedup, cpu_flags, set_cpu_threads

    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    for repeat in range(args.repeats):
        for precision in PRECISIONS:
            runs[precision].append(run(precision, args.steps, args.work / f"{precision}-{repeat}"))
    median = {p: statistics.median(r["steps_seconds"] for r in runs[p]) for p in PRECISIONS}
    flags = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx"))
    set_cpu_threads()  # the threads deltatune train times its matmul with
    probe = bf16_matmul_speedup()
    report = {"machine": device_name("cpu"), "bf16_flags": flags, "threads": torch.get_num_threads(),
              "bf16_matmul_speedup": probe, "auto": auto_precision(torch.device("cpu")),
              "torch": torch.__version__, "steps": args.steps, "runs": runs,
              "median_steps_seconds": median, "bf16_over_fp32": median["bf16"] / median["fp32"],
              "command": "python benchmarks/cpu_precision.py " + " ".join(sys.argv[1:])}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['machine']}, flags {flags}: {args.steps} steps fp32 {median['fp32']:.1f} s, "
          f"bf16 {median['bf16']:.1f} s (bf16 / fp32 {report['bf16_over_fp32']:.2f}); bf16 matmuls {probe:.2f}x "
          f"float32's, auto takes {report['auto']}")


if __name__ == "__main__":
    main()
