"""Peak memory and step time of one training run under each memory allocator this machine has.

The same short ``deltatune train`` (the default model, 4 rows of 400-512 tokens, the long
records of peak_memory.py) runs under glibc's malloc (``DELTATUNE_ALLOCATOR=system``), under
each of jemalloc and tcmalloc that the system has, under mimalloc from its wheel (a deltatune
dependency on Linux) as deltatune runs it (purging off) and with mimalloc's default one-second
purge delay, and once more under glibc told to return
every freed block at once (``MALLOC_MMAP_THRESHOLD_=131072``), whose peak is the bytes alive at
once and whose time shows what returning memory costs. The runs alternate, twice each, so a
slow spell of the machine hits every allocator alike. Writes ``allocators-cpu.json``.

    python benchmarks/allocators.py        # about ten minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

from peak_memory import long_records  # noqa: E402

from deltatune.allocator import mimalloc_from_wheel  # noqa: E402


def allocators() -> dict[str, dict[str, str]]:
    """Name -> the environment that selects it."""
    runs = {"glibc": {"DELTATUNE_ALLOCATOR": "system"}}
    for name, library in (("jemalloc", "jemalloc"), ("tcmalloc", "tcmalloc_minimal")):
        found = ctypes.util.find_library(library)
        if found:
            runs[name] = {"DELTATUNE_ALLOCATOR": found}
    wheel = mimalloc_from_wheel()
    if wheel:  # as deltatune runs it (purging off), and with mimalloc's own purge delay of one second
        runs["mimalloc"] = {"DELTATUNE_ALLOCATOR": wheel}
        runs["mimalloc, purging after 1 s"] = {"DELTATUNE_ALLOCATOR": wheel, "MIMALLOC_PURGE_DELAY": "1000"}
    runs["glibc, freed blocks returned"] = {"DELTATUNE_ALLOCATOR": "system", "MALLOC_MMAP_THRESHOLD_": "131072"}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "allocators")
    parser.add_argument("--out", type=Path, default=HERE / "allocators-cpu.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from deltatune.loading import default_model_dir

    data = long_records(args.work, AutoTokenizer.from_pretrained(str(default_model_dir())))
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "DELTATUNE_ALLOCATOR_ACTIVE", "MIMALLOC_PURGE_DELAY")}
    base["PYTHONPATH"] = str(ROOT / "src")
    results: dict[str, list] = {}
    for repeat in range(args.repeats):
        for name, env in allocators().items():
            out = args.work / f"{name.split(',')[0]}-{len(env)}-{repeat}"
            subprocess.run([sys.executable, "-m", "deltatune", "train", "--data.path", str(data), "--batch-size",
                            str(args.batch), "--max-steps", str(args.steps), "--schedule", "constant",
                            "--data.validation-fraction", "0", "--output-dir", str(out), "--overwrite"],
                           check=True, env={**base, **env}, capture_output=True, cwd=ROOT)
            summary = json.loads((out / "summary.json").read_text())
            run = {"peak_mib": summary["peak_memory_mib"], "steps_seconds": summary["time_seconds"]["steps"],
                   "allocator": summary["allocator"], "final_train_loss": summary["final_train_loss"]}
            results.setdefault(name, []).append(run)
            print(name, json.dumps(run), flush=True)
    rows = [{"allocator": name, "peak_mib": max(r["peak_mib"] for r in runs),
             "median_steps_seconds": statistics.median(r["steps_seconds"] for r in runs), "runs": runs}
            for name, runs in results.items()]
    glibc = next(r for r in rows if r["allocator"] == "glibc")
    for row in rows:
        row["peak_over_glibc"] = row["peak_mib"] / glibc["peak_mib"]
        row["time_over_glibc"] = row["median_steps_seconds"] / glibc["median_steps_seconds"]
    from deltatune.bench.run import device_name

    machine = {"processor": platform.machine(), "name": device_name("cpu"), "cpus": os.cpu_count()}
    args.out.write_text(json.dumps({"machine": machine,
                                    "batch": args.batch, "steps": args.steps, "records": "400-512 tokens",
                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
