"""The default model quantized: load memory against float32, bits per parameter, QLoRA learning."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune import quant
from deltatune.cli.demo import FACTS, chat_batch, train_steps

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "load_memory.py"


def test_nf4_default_model_learns_with_qlora():
    model, tokenizer = dt.load_model(quantize="nf4")
    report = quant.memory_report(model)
    assert report.kind == "4bit+double_quant"
    assert report.bits_per_parameter == pytest.approx(4.127, abs=0.002)
    dt.add_adapter(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    losses = train_steps(model, chat_batch(tokenizer, FACTS[:2]), steps=4, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1


def test_nf4_load_holds_far_less_memory_than_float32():
    out = subprocess.run([sys.executable, str(BENCH), "--modes", "fp32,nf4", "--json", "/dev/stdout"],
                         capture_output=True, text=True, check=True).stdout
    rows = {r["mode"]: r for r in json.loads(out[out.index("["):])}
    fp32, nf4 = rows["fp32"], rows["nf4"]
    print(json.dumps(rows, indent=1))
    assert nf4["weights_mib"] < 0.35 * fp32["weights_mib"]
    # What the process holds once every weight is resident, above the pre-load baseline.
    assert nf4["resident_increase_mib"] < 0.7 * fp32["resident_increase_mib"]
    # The peak during a forward pass is not asserted: it moves with the allocator's arenas
    # (193 to 449 MiB for NF4 in repeated runs on one machine), while the resident figure is stable.
