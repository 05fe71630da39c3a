"""One QDyLoRA run against a QLoRA run per rank: does one run serve every rank?

On the default job (the embedded model, the Velmar data, deltatune's default settings), trains
one DyLoRA adapter of rank 16 (ranks 1-16 drawn per step) and, with the same data, steps,
learning rate and schedule, one plain LoRA adapter at each rank of ``--ranks``; on a 4-bit NF4
base by default (QDyLoRA against QLoRA; ``--quantize ''`` for float32). Then scores, on the
test split (which no setting was chosen on), the DyLoRA adapter cut to each rank
(``deltatune eval --ranks``) and each plain adapter, and writes the table: ROUGE-L, exact
match and perplexity per rank, both ways, and the training times.

    python benchmarks/dylora_ranks.py                       # about 35 minutes on 2 CPU cores
    python benchmarks/dylora_ranks.py --small --model DIR   # a smoke test on a tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VELMAR = ROOT / "src" / "deltatune" / "datasets" / "velmar"
SCORES = ("rougeL", "exact_match", "perplexity")


def _deltatune(args: list[str]) -> None:
    """Run ``deltatune ARGS``."""
    subprocess.run([sys.executable, "-m", "deltatune", *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4,8,16")
    parser.add_argument("--quantize", default="nf4", help="nf4 (QDyLoRA against QLoRA), fp4, or '' (float32)")
    parser.add_argument("--model", default="", help="a Hugging Face folder; empty: the embedded default model")
    parser.add_argument("--data", default="", help="training data; empty: the default job's")
    parser.add_argument("--test", default=str(VELMAR / "test.jsonl"))
    parser.add_argument("--small", action="store_true", help="two steps and four examples: checks the script")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "dylora-ranks")
    parser.add_argument("--out", type=Path, default=HERE / "dylora-ranks-cpu.json")
    parser.add_argument("--reuse", action="store_true",
                        help="keep training runs of an earlier invocation that finished (their summary.json)")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    common = ["--final-eval", "off", "--save-steps", "0"]
    common += ["--model", args.model] if args.model else []
    common += ["--data.path", args.data] if args.data else []
    common += ["--quantize", args.quantize] if args.quantize else []
    common += ["--max-steps", "2"] if args.small else []
    evaluation = ["--data", args.test, "--max-new-tokens", "4" if args.small else "32"]
    evaluation += ["--model", args.model] if args.model else []
    evaluation += ["--quantize", args.quantize] if args.quantize else []
    evaluation += ["--limit", "4"] if args.small else []
    work = args.work
    runs = {"dylora": ["--method", "dylora", "--lora.r", str(max(ranks))],
            **{f"lora-r{rank}": ["--lora.r", str(rank)] for rank in ranks}}
    seconds = {}  # each run's own training time (its summary.json), process start-up not counted
    for name, flags in runs.items():
        summary = work / name / "summary.json"
        if not (args.reuse and summary.is_file()):
            _deltatune(["train", *flags, *common, "--output-dir", str(work / name), "--overwrite"])
        seconds[name] = json.loads(summary.read_text())["seconds"]
    _deltatune(["eval", "--adapter", str(work / "dylora"), "--ranks", args.ranks, *evaluation,
                "--output-dir", str(work / "eval-dylora")])
    _deltatune(["eval", *[a for r in ranks for a in ("--adapter", str(work / f"lora-r{r}"))], *evaluation,
                "--output-dir", str(work / "eval-lora")])
    dylora = json.loads((work / "eval-dylora" / "metrics.json").read_text())
    lora = json.loads((work / "eval-lora" / "metrics.json").read_text())
    rows = [{"rank": r, "dylora": {k: dylora[f"dylora@r{r}"][k] for k in SCORES},
             "lora": {k: lora[f"lora-r{r}"][k] for k in SCORES}} for r in ranks]
    summary = json.loads((work / "dylora" / "summary.json").read_text())
    import torch
    report = {"machine": {"processor": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
              "quantize": args.quantize or "none", "steps": summary["steps"], "test": args.test,
              "base": {k: dylora["base"][k] for k in SCORES}, "rows": rows, "train_seconds": seconds,
              "command": "python benchmarks/dylora_ranks.py " + " ".join(sys.argv[1:])}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(row["rank"], json.dumps(row["dylora"]), json.dumps(row["lora"]))


if __name__ == "__main__":
    main()
