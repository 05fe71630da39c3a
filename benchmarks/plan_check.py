"""``deltatune plan`` against measured runs: for each configuration, the planner's prediction
(``deltatune plan --json`` in a fresh process, so its runtime and CPU rates are measured as a
training process would see them) beside a short real ``deltatune train`` on the same shape and
batch. Writes ``benchmarks/plan-check-cpu.json`` with both peaks, the planner's breakdown, and the
median tokens/s of steps 3-5 of a five-step run (the first two warm up).

    python benchmarks/plan_check.py                 # tiny models and the default model, ~5 min on 2 cores
    python benchmarks/plan_check.py --only tiny     # the tiny models alone (seconds)

The planner and the runs whose peak is compared run with ``MALLOC_MMAP_THRESHOLD_=131072``
(large blocks are returned to the system when freed, so the maximum resident set follows live
bytes rather than glibc's cached free memory) and ``DELTATUNE_ALLOCATOR=system``; tokens/s come
from a second run of each compared case in the ordinary environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "DELTATUNE_ALLOCATOR": "system"}
MEMORY_TOLERANCE, SPEED_TOLERANCE = 0.15, 0.30
SPEED_STEPS, WARMUP_STEPS = 5, 2  # steps of a timed run; the first ones left out of its median
PROMPT_TOKENS = 8  # "Tell a story number N:" with BOS: the positions of each row that are not trained


@dataclass
class Case:
    """One configuration: a model ("tiny", "tiny-wide" or "default"), a batch and train flags."""

    name: str
    model: str
    rows: int
    seq_len: int
    flags: list = field(default_factory=list)
    speed: bool = True  # time a run of its own
    # hold tokens/s to the tolerance: a tiny model's step is mostly the fixed work around it
    # (optimizer, clipping, a loss over the whole vocabulary), which one block does not show
    compare: bool = True


CASES = [
    Case("tiny lora 4x64", "tiny", 4, 64, compare=False),
    Case("tiny dora 8x128", "tiny", 8, 128, ["--method", "dora"], compare=False),
    Case("tiny-wide lora 4x256 checkpointing", "tiny-wide", 4, 256, ["--gradient-checkpointing"], compare=False),
    Case("default lora 1x256", "default", 1, 256),
    Case("default lora 4x256", "default", 4, 256),
    Case("default lora 2x512 checkpointing", "default", 2, 512, ["--gradient-checkpointing"]),
]


def write_data(path: Path, records: int = 64, words: int = 1200) -> Path:
    """Prompt/completion records far longer than any case's rows, so every row is cut to seq_len."""
    import random

    rng = random.Random(0)
    vocab = "alpha beta gamma delta river stone cloud forest quiet amber north lantern velvet orbit".split()
    path.write_text("".join(json.dumps({"prompt": f"Tell a story number {i}:",
                                        "completion": " " + " ".join(rng.choice(vocab) for _ in range(words))}) + "\n"
                            for i in range(records)))
    return path


def tiny_model(folder: Path, wide: bool) -> Path:
    """A small random Llama with the default model's tokenizer (tests/tiny_models.py's recipe)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltatune.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    size = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4) if wide else \
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    config = LlamaConfig(vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **size)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(args: list, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def check(case: Case, model_dir: str, data: Path, work: Path, with_speed: bool = True) -> dict:
    """Plan, then train two steps; both in fresh processes with the allocator settings. ``with_speed``:
    also plan and time a run of its own for the cases that measure speed (``case.speed``)."""
    env = {**os.environ, **ENV}
    python = sys.executable
    out = work / case.name.replace(" ", "-")
    flags = ["--batch-size", str(case.rows), "--data.max-seq-len", str(case.seq_len)]
    share = 1 - PROMPT_TOKENS / case.seq_len
    plan_flags = ["--batch", str(case.rows), "--seq-len", str(case.seq_len), "--no-padded",
                  "--labelled-share", f"{share:.4f}", "--json", str(out) + ".plan.json"]
    if "--method" in case.flags:
        plan_flags += ["--method", case.flags[case.flags.index("--method") + 1]]
    if "--gradient-checkpointing" in case.flags:
        plan_flags.append("--gradient-checkpointing")
    model_flag = ["--model", model_dir] if model_dir else []
    _run([python, "-m", "deltatune", "plan", *model_flag, *plan_flags], env)
    plan = json.loads(Path(str(out) + ".plan.json").read_text())
    train = [python, "-m", "deltatune", "train", *model_flag, "--data.path", str(data), "--max-steps", "2",
             "--data.validation-fraction", "0", "--final-eval", "off", "--overwrite", "--warmup-steps", "1",
             "--logging-steps", "1", *flags, *case.flags]
    _run([*train, "--output-dir", str(out)], env)
    summary = json.loads((out / "summary.json").read_text())
    # speed from a run of its own in the ordinary environment: returning every freed block to
    # the system (what makes the peak follow live bytes) slows a step by page faults
    speed = case.speed and with_speed
    timed = out if not speed else Path(str(out) + "-speed")
    speed_plan, stolen = plan, None
    if speed:
        # planned again right before the timed run, so that the planner's CPU rates and the run
        # see the machine in the same state (a shared machine's speed drifts over minutes)
        plan_flags[plan_flags.index("--json") + 1] = str(out) + ".speed-plan.json"
        _run([python, "-m", "deltatune", "plan", *model_flag, *plan_flags], dict(os.environ))
        speed_plan = json.loads(Path(str(out) + ".speed-plan.json").read_text())
        speed_run = [*train, "--output-dir", str(timed)]
        speed_run[speed_run.index("--max-steps") + 1] = str(SPEED_STEPS)
        before = cpu_ticks()
        _run(speed_run, dict(os.environ))
        stolen = stolen_share(before, cpu_ticks())
    tokens = case.rows * case.seq_len
    seconds = step_seconds(timed / "metrics.jsonl", tokens)
    # the planner predicts a steady step: the first steps also page in fresh memory and warm
    # caches, so tokens/s is the median of the steps after WARMUP_STEPS
    measured_speed = tokens / statistics.median(seconds[WARMUP_STEPS:] or seconds[-1:])
    predicted_speed = speed_plan["tokens_per_s"]
    measured, predicted = summary["peak_memory_mib"], plan["peak_mib"]
    result = {"case": case.name, "rows": case.rows, "seq_len": case.seq_len, "train_flags": case.flags,
              "measured_peak_mib": measured, "predicted_peak_mib": predicted,
              "memory_error": predicted / measured - 1, "breakdown_mib": plan["memory_mib"],
              "precision": summary["precision"], "trainable_parameters": summary["trainable_parameters"],
              "predicted_trainable_parameters": plan["trainable_parameters"],
              "measured_tokens_per_s": measured_speed, "predicted_tokens_per_s": predicted_speed,
              "speed_compared": speed and case.compare, "speed_error": predicted_speed / measured_speed - 1,
              "step_seconds": seconds, "cpu_time_stolen_share": stolen, "roofline": speed_plan["speed"]}
    print(f"{case.name:40s} peak {measured:8,.0f} MiB measured, {predicted:8,.0f} predicted ({result['memory_error']:+.1%}); "
          f"{measured_speed:7,.0f} tokens/s measured, {predicted_speed:7,.0f} predicted ({result['speed_error']:+.1%})",
          flush=True)
    return result


def cpu_ticks() -> list:
    """This machine's CPU time counters (``/proc/stat``: user, nice, system, idle, iowait, irq,
    softirq, steal), or an empty list off Linux."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return []


def stolen_share(before: list, after: list):
    """The share of CPU time the hypervisor gave to other machines between two ``cpu_ticks``."""
    if len(before) < 8 or len(after) < 8:
        return None
    spent = [b - a for a, b in zip(before, after)]
    return spent[7] / max(1, sum(spent))


def step_seconds(metrics: Path, tokens: int) -> list:
    """Each logged step's seconds, from the cumulative tokens/s that ``metrics.jsonl`` records."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    elapsed = [row["step"] * tokens / row["tokens_per_s"] for row in rows]
    return [later - earlier for earlier, later in zip([0.0] + elapsed, elapsed)]


def run_cases(cases: list, work: Path, with_speed: bool = True) -> list:
    """Every case in ``cases``, tiny models built under ``work``; ``with_speed=False`` leaves out
    the timed runs (memory only, as the CI test checks)."""
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work / "long.jsonl")
    models = {"default": "", "tiny": str(tiny_model(work / "tiny", False)),
              "tiny-wide": str(tiny_model(work / "tiny-wide", True))}
    return [check(case, models[case.model], data, work, with_speed) for case in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("tiny", "default"), default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "plan-check")
    parser.add_argument("--out", type=Path, default=HERE / "plan-check-cpu.json")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or c.model.startswith(args.only)]
    results = run_cases(cases, args.work)
    import torch

    load = os.getloadavg()
    report = {"machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "load_average_1_5_15": load},
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "environment": ENV, "tolerances": {"memory": MEMORY_TOLERANCE, "tokens_per_s": SPEED_TOLERANCE},
              "cases": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

