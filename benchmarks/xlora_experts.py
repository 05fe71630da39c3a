"""Two LoRA experts for X-LoRA's row in ``deltatune compare``: each knows part of the default job.

X-LoRA learns, token by token, how much of each of several frozen LoRA adapters to use. On one
task it has nothing to choose between, so this script makes two experts that each know some of
the Velmar orders: expert ``a`` is trained on the training (and validation) records of the
Scaleward and Deepfin orders, expert ``b`` on the other three. Both use LoRA's recipe and the
default job's step budget; the test file is not read. Then X-LoRA, trained on all the training
records, has to route each question to the expert that knows its order:

    python benchmarks/xlora_experts.py --output-dir runs/xlora-experts
    deltatune compare --methods xlora --lr-search 4 \\
        --method-options '{xlora: {adapters: {a: runs/xlora-experts/a/adapter, b: runs/xlora-experts/b/adapter}}}'

It prints the ``--method-options`` value and each expert's validation loss on its own orders.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import deltatune as dt

DATA = Path(dt.__file__).parent / "datasets" / "velmar"
GROUPS = {"a": ("Scaleward", "Deepfin"), "b": ("Chitterling", "Skyrell", "Furrowkin")}


def order_of(record: dict) -> str:
    """The Velmar order a record's answer names ("The X belongs to the Order.")."""
    return record["messages"][-1]["content"].rstrip(".").split()[-1]


def split(name: str, orders: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """The training and validation records of ``orders``, written under ``folder``."""
    paths = {}
    for part in ("train", "validation"):
        records = [json.loads(line) for line in (DATA / f"{part}.jsonl").read_text().splitlines() if line.strip()]
        kept = [r for r in records if order_of(r) in orders]
        paths[part] = folder / f"{name}-{part}.jsonl"
        paths[part].write_text("".join(json.dumps(r) + "\n" for r in kept))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/xlora-experts")
    parser.add_argument("--max-steps", type=int, default=60, help="steps per expert (the default job's budget)")
    args = parser.parse_args()
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    adapters = {}
    for name, orders in GROUPS.items():
        paths = split(name, orders, folder)
        out = folder / name
        if not (out / "summary.json").is_file():
            cmd = [sys.executable, "-m", "deltatune", "train", "--method", "lora", "--data.path", str(paths["train"]),
                   "--data.validation-path", str(paths["validation"]), "--max-steps", str(args.max_steps),
                   "--final-eval", "off", "--output-dir", str(out), "--overwrite"]
            with open(folder / f"{name}.log", "w") as log:
                subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        summary = json.loads((out / "summary.json").read_text())
        print(f"expert {name} ({', '.join(orders)}): validation loss {summary['initial_validation_loss']:.3f} -> "
              f"{summary['final_validation_loss']:.3f}")
        adapters[name] = str(out / "adapter")
    print(json.dumps({"xlora": {"adapters": adapters}}))


if __name__ == "__main__":
    main()
