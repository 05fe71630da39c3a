"""Peak memory of a training run at a fixed batch size: `deltatune train` against the plain
transformers + HF PEFT loop (quality_loop.py), each in its own process, on long examples.

The records are standard-library functions of 400 to 512 tokens (the docstring task's
prompts, built long), so every batch is near 4 x 512 or 8 x 512 tokens, the shape at which the
issue that asked for this measured 6.4 GiB (batch 4) and 12.2 GB (batch 8). Both run a few
steps at the loop's settings; the figure is the process's peak resident memory (max RSS),
next to the steps' seconds. More deltatune runs per batch size: under glibc's malloc instead of
the allocator the command picks (``allocator.py``: tcmalloc where the system has it, else
mimalloc from its wheel, else jemalloc), with gradient checkpointing (the memory a user can trade time for), without
``cheap_recompute`` (what it saves and costs), and, with ``--before-src``, the source tree of an
earlier commit (the figure this issue's target is measured against, on the same records and
machine; it ran under glibc's malloc, as the plain loop does).

    python benchmarks/peak_memory.py          # about ten minutes on 2 CPU cores
    git worktree add /tmp/before f021478~1 && python benchmarks/peak_memory.py --before-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from quality_tasks import module_functions  # noqa: E402


def long_records(out: Path, tokenizer, count: int = 48) -> Path:
    """``count`` docstring-task records of 400-512 tokens, written to ``out``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for path in sorted(stdlib.glob("*.py")):
        for record in module_functions(path, path.stem, 4000):
            if 400 <= len(tokenizer(record["prompt"] + record["completion"])["input_ids"]) <= 512:
                records.append(record)
        if len(records) >= count:
            break
    out.mkdir(parents=True, exist_ok=True)
    target = out / "long.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in records[:count]))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4,8")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--before-src", type=Path, default=None,
                        help="an earlier commit's src folder, run as a third deltatune column")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "peak-memory")
    parser.add_argument("--out", type=Path, default=HERE / "peak-memory-cpu.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer
    from deltatune.loading import default_model_dir
    model = str(default_model_dir())
    data = long_records(args.work, AutoTokenizer.from_pretrained(model))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])}
    rows = []
    for batch in map(int, args.batches.split(",")):
        loop = args.work / f"loop-b{batch}"
        subprocess.run([sys.executable, str(HERE / "quality_loop.py"), "--model", model, "--train", str(data),
                        "--steps", str(args.steps), "--batch", str(batch), "--out", str(loop)], check=True, env=env,
                       capture_output=True)
        loop_result = json.loads((loop / "result.json").read_text())
        row = {"batch_size": batch, "peft_loop_peak_mib": loop_result["peak_memory_mib"],
               "peft_loop_steps_seconds": loop_result["time_seconds"]["steps"]}
        glibc = {"DELTATUNE_ALLOCATOR": "system"}
        runs = {"deltatune": ([], ROOT / "src", {}),
                "deltatune_glibc": ([], ROOT / "src", glibc),
                "deltatune_checkpointing": (["--gradient-checkpointing"], ROOT / "src", {}),
                "deltatune_no_recompute": (["--no-cheap-recompute"], ROOT / "src", {})}
        if args.before_src:
            runs["before"] = ([], args.before_src, {})
        for name, (extra, src, allocator) in runs.items():
            mine = args.work / f"{name}-b{batch}"
            subprocess.run([sys.executable, "-m", "deltatune", "train", "--data.path", str(data), "--batch-size",
                            str(batch), "--max-steps", str(args.steps), "--schedule", "constant",
                            "--data.validation-fraction", "0", *extra, "--output-dir", str(mine), "--overwrite"],
                           check=True, env={**env, "PYTHONPATH": str(src), **allocator}, capture_output=True, cwd=ROOT)
            summary = json.loads((mine / "summary.json").read_text())
            row[f"{name}_peak_mib"] = summary["peak_memory_mib"]
            row[f"{name}_steps_seconds"] = summary["time_seconds"]["steps"]
            row[f"{name}_allocator"] = summary.get("allocator", "system")
            row["padding_share"] = summary["padding_share"]
        row["deltatune_over_loop"] = row["deltatune_peak_mib"] / row["peft_loop_peak_mib"]
        row["recompute_over_none"] = row["deltatune_peak_mib"] / row["deltatune_no_recompute_peak_mib"]
        if args.before_src:
            row["deltatune_over_before"] = row["deltatune_peak_mib"] / row["before_peak_mib"]
            row["checkpointing_over_before"] = row["deltatune_checkpointing_peak_mib"] / row["before_peak_mib"]
            row["glibc_over_before"] = row["deltatune_glibc_peak_mib"] / row["before_peak_mib"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"machine": {"processor": platform.machine(), "cpus": os.cpu_count()},
                                    "records": str(data), "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
