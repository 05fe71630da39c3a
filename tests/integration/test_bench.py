"""``deltatune bench`` as a smoke test on a tiny shape (not a timed test: no speed is asserted)."""

import json
import os
import subprocess
import sys

import pytest
from transformers import LlamaConfig, Qwen3MoeConfig

from deltatune.cli import main


def _bench(tmp_path, hidden: int, cases: str, *flags: str) -> dict:
    """Run ``deltatune bench`` on a tiny random Llama shape; returns bench.json (asserting exit 0)."""
    shape = tmp_path / "shape"
    LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).save_pretrained(shape)
    out = tmp_path / "bench"
    assert main(["bench", "--device", "cpu", "--shape", str(shape), "--cases", cases, "--batch-size", "2",
                 "--seq-len", "32", "--steps", "2", "--warmup", "1", "--output-dir", str(out), *flags]) == 0
    return json.loads((out / "bench.json").read_text())


def test_bench_runs_both_tools_and_writes_its_table(tmp_path):
    result = _bench(tmp_path, 32, "lora+dropout+bias,dora,full", "--memory")
    out = tmp_path / "bench"
    assert [(r["case"], r["tool"]) for r in result["rows"]] == [
        ("lora+dropout+bias", "deltatune"), ("lora+dropout+bias", "peft"), ("dora", "deltatune"), ("dora", "peft"),
        ("full", "full")]
    for line in result["summary"][:2]:
        # same weights, same batch, B = 0 at the start: both tools must see the same first loss
        assert line["same_first_loss"] is True
        assert line["speedup"] == line["deltatune"]["tokens_per_s"] / line["peft"]["tokens_per_s"]
        assert line["deltatune"]["tflops"] > 0 and line["deltatune"]["memory"]["optimizer_mib"] > 0
    table = (out / "bench.md").read_text()
    assert "| dora |" in table and "full (transformers alone)" in table and "activations" in table
    assert (out / "bench.png").stat().st_size > 0


def test_bench_runs_both_tools_under_bf16_autocast_when_asked(tmp_path):
    result = _bench(tmp_path, 32, "lora", "--precision", "bf16", "--no-flops")
    assert {r["tool"]: r["precision"] for r in result["rows"]} == {"deltatune": "bf16", "peft": "bf16"}
    fp32 = _bench(tmp_path / "fp32", 32, "lora", "--no-flops")
    assert {r["precision"] for r in fp32["rows"]} == {"fp32"}
    # bf16 matmuls really ran: the first loss moves off float32's, for both tools alike
    ours, theirs = (result["summary"][0][tool]["first_loss"] for tool in ("deltatune", "peft"))
    assert ours != fp32["summary"][0]["deltatune"]["first_loss"]
    assert result["summary"][0]["same_first_loss"] is True, (ours, theirs)
    assert "float32, bf16 autocast," in (tmp_path / "bench" / "bench.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--cases", "lora,qlora8"], "qlora8"), (["--shape", "nowhere"], "config.json"), (["--dtype", "fp8"], "fp8"),
    (["--r", "0", "--cases", "lora"], "--r"), (["--cases", "lora+offload"], "needs --device cuda"),
    (["--optimizer", "sgd"], "--optimizer"), (["--cases", "moe-lora"], "not a mixture-of-experts shape"),
    (["--peft-allocator", "tcmalloc"], "--peft-allocator"), (["--precision", "fp16"], "--precision")])
def test_bench_refuses_bad_settings(args, message, capsys):
    assert main(["bench", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_4bit_cases_run_against_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    result = _bench(tmp_path, 64, "qlora+recipe,qdora", "--no-flops", "--optimizer", "adamw_8bit")
    assert [(r["case"], r["tool"]) for r in result["rows"]] == [
        ("qlora+recipe", "deltatune"), ("qlora+recipe", "peft"), ("qdora", "deltatune"), ("qdora", "peft")]
    assert result["settings"]["optimizer"] == "adamw_8bit"
    assert "8-bit AdamW" in (tmp_path / "bench" / "bench.md").read_text()
    for line in result["summary"]:
        # the same NF4 bytes on both sides (bitsandbytes' quantizer and deltatune's agree byte for
        # byte), the same batch and B = 0: the first losses agree
        assert line["same_first_loss"] is True, line
        # both keep the same packed bytes: the weights figure counts deltatune's, which are no parameters
        ours, theirs = line["deltatune"]["memory"]["parameters_mib"], line["peft"]["memory"]["parameters_mib"]
        assert abs(ours - theirs) < 0.1 * theirs, (ours, theirs)


def test_bench_moe_cases_run_both_tools_with_grouped_experts(tmp_path):
    shape = tmp_path / "moe-shape"
    # large enough per expert (8 experts of 64 x 64) against 2 x 32 tokens that compute='auto' takes
    # the grouped path rather than forming W + delta W
    Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                   num_experts_per_tok=2, max_position_embeddings=64).save_pretrained(shape)
    out = tmp_path / "bench"
    # no --cases: a mixture-of-experts shape defaults to the moe cases (one of them runs here)
    from deltatune.cli.bench import BenchConfig, _resolved

    assert _resolved(BenchConfig(device="cpu", shape=str(shape))).cases == ["moe-lora", "moe-lora+checkpointing"]
    assert main(["bench", "--device", "cpu", "--shape", str(shape), "--batch-size", "2", "--seq-len", "32",
                 "--steps", "2", "--warmup", "1", "--no-flops", "--cases", "moe-lora", "--output-dir", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert [(r["case"], r["tool"]) for r in result["rows"]] == [("moe-lora", "deltatune"), ("moe-lora", "peft")]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["peak_memory_mib"] > 0
    ours = [r for r in result["rows"] if r["tool"] == "deltatune"]
    theirs = [r for r in result["rows"] if r["tool"] == "peft"]
    for row in ours:
        assert row["expert_path"] == "grouped", row["expert_path_reasons"]
        assert row["expert_compute"] == ["auto"]
    # attention at r=16 plus 8 experts' gate/up and down at r=16 each, the same count on both sides
    layer = 16 * (64 + 4 * 16) + 16 * (64 + 2 * 16) * 2 + 16 * (4 * 16 + 64)
    experts = 8 * 16 * (64 + 2 * 32) + 8 * 16 * (32 + 64)
    assert [r["trainable_parameters"] for r in ours] == [2 * (layer + experts)]
    assert [r["trainable_parameters"] for r in theirs] == [2 * (layer + experts)]
    for line in result["summary"]:
        assert line["same_first_loss"] is True, line
    table = (out / "bench.md").read_text()
    assert "| moe-lora (deltatune experts: grouped) |" in table and "fused expert weights" in table


def test_peft_runs_under_glibc_when_asked(tmp_path):
    """Run as a user runs it (the command relaunches itself under its allocator), ``--peft-allocator
    system`` gives the PEFT worker glibc's malloc and leaves deltatune's worker under the command's."""
    from deltatune.allocator import ACTIVE, SETTING, find_allocator

    env = {k: v for k, v in os.environ.items() if k not in (ACTIVE, "LD_PRELOAD", SETTING)}
    chosen = find_allocator(env)
    shape = tmp_path / "shape"
    LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(shape)
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "deltatune", "bench", "--device", "cpu", "--shape", str(shape),
                           "--cases", "lora", "--batch-size", "2", "--seq-len", "32", "--steps", "1", "--warmup", "1",
                           "--no-flops", "--peft-allocator", "system", "--output-dir", str(out)],
                          env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "bench.json").read_text())
    used = {r["tool"]: r["allocator"] for r in result["rows"]}
    assert used == {"deltatune": chosen[0] if chosen else "system", "peft": "system"}
    assert f"Memory allocator: deltatune {used['deltatune']}, peft system." in (out / "bench.md").read_text()
