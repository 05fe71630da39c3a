"""Does `torch.compile` pay for a LoRA training step? Eager against compiled, in one run.

The `deltatune bench` step (the default model, 4 rows of 256 tokens of the default job's
data, LoRA r=16 alpha=32 on all linear layers, deltatune's layers and loss, AdamW) run eagerly,
then with each decoder layer compiled (`torch.compile` per block, so the thirty identical
blocks compile once): the first compiled step's extra time is the compile time. Writes
`benchmarks/compile-step-<device>.json` with both medians, the compile seconds, whether the
losses agree, and the number of steps a run needs before compiling has paid for itself.

    python benchmarks/compile_step.py                  # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.bench.cases import load_base, sft_batch
from deltatune.loss import TrainingLoss
from default_job import machine

HERE = Path(__file__).parent


def build(device: str, dropout: float):
    model = load_base("default", torch.float32, device)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    dt.add_adapter(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=dropout))
    model.train()
    loss_fn = TrainingLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, loss_fn, optimizer


def timed_steps(loss_fn, optimizer, batch, steps: int, device: str) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return times, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after the first (warm-up/compile) one")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or HERE / f"compile-step-{args.device}.json"
    runs = {}
    for mode in ("eager", "compiled"):
        model, loss_fn, optimizer = build(args.device, args.dropout)
        batch = sft_batch(4, 256, model.config.vocab_size, device=args.device)
        if mode == "compiled":
            for layer in model.base_model.layers:
                layer.compile()
        times, losses = timed_steps(loss_fn, optimizer, batch, args.steps + 1, args.device)
        runs[mode] = {"first_step_s": times[0], "median_step_s": statistics.median(times[1:]),
                      "step_seconds": times[1:], "losses": losses}
        print(mode, {k: v for k, v in runs[mode].items() if k != "losses"}, flush=True)
    eager, compiled = runs["eager"], runs["compiled"]
    compile_s = compiled["first_step_s"] - compiled["median_step_s"] - (eager["first_step_s"] - eager["median_step_s"])
    saved = eager["median_step_s"] - compiled["median_step_s"]
    result = {
        "machine": machine(), "device": args.device, "torch": torch.__version__, "dropout": args.dropout,
        "eager": eager, "compiled": compiled, "compile_seconds": compile_s,
        "speedup": eager["median_step_s"] / compiled["median_step_s"],
        "losses_agree": all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(eager["losses"], compiled["losses"])),
        "steps_to_break_even": compile_s / saved if saved > 0 else None,
        "command": f"python benchmarks/compile_step.py --device {args.device} --steps {args.steps}"
                   + (f" --dropout {args.dropout}" if args.dropout else ""),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("eager", "compiled")}, indent=2))


if __name__ == "__main__":
    main()
