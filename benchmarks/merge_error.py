"""Measured merge errors on the default model: float32, NF4, FP4 and int8 bases, with and
without re-quantizing the merged weights.

For each base, a LoRA adapter (r=16, all linear layers) is trained for a few steps on the
demo's facts, then merged; the error is measured on the fixed probe text against the
unmerged model (``dt.merge`` reports it). Also printed: the error the quantization of the
base itself causes on the same probe (quantized base vs float32 base, no adapter).

    python benchmarks/merge_error.py [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict

import torch

import deltatune as dt
from deltatune.cli.demo import FACTS, chat_batch, train_steps
from deltatune.merge_report import probe_ids
from tables import merge_error_table  # benchmarks/tables.py: the table docs/quantization.md shows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    full, tok = dt.load_model()
    ids = probe_ids(full, tok)
    with torch.no_grad():
        full_logits = full(ids).logits
    rows = []
    for mode in ("fp32", "nf4", "fp4", "int8"):
        model, _ = dt.load_model(quantize=None if mode == "fp32" else mode, tokenizer=False)
        with torch.no_grad():
            base_error = (model(ids).logits - full_logits).abs().max().item()
        dt.add_adapter(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        torch.manual_seed(0)
        train_steps(model, chat_batch(tok, FACTS), steps=args.steps, lr=2e-3)
        for requantize in ([False] if mode == "fp32" else [False, True]):
            merged = copy.deepcopy(model)
            report = dt.merge(merged, tokenizer=tok, requantize=requantize, verbose=False)
            rows.append({"base": mode, "requantize": requantize, "base_quantization_error": base_error,
                         **asdict(report)})
            print(f"{mode:5} requantize={requantize!s:5} base-quant max|Δ| {base_error:8.4f}  {report}")
    print("\n" + merge_error_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
