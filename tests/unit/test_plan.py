"""``deltatune plan``'s memory terms by hand-computable numbers, and the way it picks to run."""

import dataclasses
import json

import pytest

from deltatune.distributed.plan import (GiB, Run, base_weight_bytes, choose, command, make_plan, memory_terms,
                                        parse_memory, trainable_parameters)
from deltatune.distributed.plan_activations import StepShape, activations
from deltatune.distributed.plan_shapes import LINEARS, PRESETS, load_shape, shape_from_config
from deltatune.distributed.plan_speed import CUDA_CONTEXT_BYTES, DEVICES

SMOL = shape_from_config(dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True))
H100 = DEVICES["h100"]


def test_parameter_counts_match_the_model_cards():
    assert abs(load_shape("llama-2-7b").parameters() - 6.738e9) < 2e6
    assert abs(load_shape("llama-2-70b").parameters() - 68.98e9) < 2e7
    assert abs(SMOL.parameters() - 134_515_008) < 1000  # the default model as transformers counts it


def test_base_weights_are_parameters_times_bytes_and_shard_under_fsdp():
    run = Run()
    assert base_weight_bytes(SMOL, run) == SMOL.parameters() * 4
    assert base_weight_bytes(SMOL, dataclasses.replace(run, base_dtype="bf16")) == SMOL.parameters() * 2
    one, _ = memory_terms(SMOL, run, 0)
    eight, _ = memory_terms(SMOL, dataclasses.replace(run, strategy="fsdp", world=8), 0)
    assert eight["base weights"] == -(-one["base weights"] // 8)
    assert eight["optimizer states"] * 8 >= one["optimizer states"] > eight["optimizer states"] * 7


def test_lora_trainable_parameters_and_adam_states():
    run = Run()
    assert trainable_parameters(SMOL, run) == 4_884_480  # what deltatune train reports for the default model
    terms, n = memory_terms(SMOL, run, 0)
    assert terms["adapter weights"] == terms["gradients"] == 4 * n
    assert terms["optimizer states"] == 8 * n  # AdamW: two float32 moments
    dora = trainable_parameters(SMOL, dataclasses.replace(run, method="dora"))
    outs = SMOL.linear_outputs()
    assert dora - n == SMOL.layers * sum(outs[name] for name in LINEARS)  # one magnitude per output


def test_qlora_stores_about_four_and_a_bit_bits_per_quantized_weight():
    shape = load_shape("llama-2-7b")
    run = Run(method="qlora")
    linear = shape.layers * shape.block_linear_parameters()
    quantized = base_weight_bytes(shape, run) - shape.other_parameters() * 4
    assert 4.1 <= 8 * quantized / linear <= 4.5


def test_activations_reproduce_the_saved_tensors_of_the_default_model():
    # benchmarks/saved-activations-cpu.json: autograd's saved storages at 4 x 480 tokens, one row padded
    measured = json.loads(open("benchmarks/saved-activations-cpu.json").read())["runs"]
    step = StepShape(4, 480, 4, 4, padded=True, labelled_share=1496 / 1920)
    kept = activations(SMOL, step, frozenset(LINEARS), 16, 0.05, False, False, cheap_recompute=False)
    lean = activations(SMOL, step, frozenset(LINEARS), 16, 0.05, False, False, cheap_recompute=True)
    assert kept.saved == pytest.approx(measured["kept"]["saved_bytes"], rel=0.01)
    assert lean.saved == pytest.approx(measured["cheap_recompute"]["saved_bytes"], rel=0.01)


def test_checkpointing_lowers_activations():
    plain = make_plan(SMOL, Run(rows=4, seq_len=1024), H100, CUDA_CONTEXT_BYTES)
    ckpt = make_plan(SMOL, Run(rows=4, seq_len=1024, gradient_checkpointing=True), H100, CUDA_CONTEXT_BYTES)
    kept = lambda plan: sum(v for k, v in plan.memory.items() if k.startswith("activations"))  # noqa: E731
    assert kept(ckpt) < kept(plain) / 5
    assert ckpt.peak < plain.peak and ckpt.tokens_per_s < plain.tokens_per_s  # recompute costs time


def _choice(model, gpus, gb, **run):
    return choose(load_shape(model), Run(precision="bf16", rows=1, seq_len=2048, **run), gpus, gb * 10 ** 9,
                  H100, CUDA_CONTEXT_BYTES)


def test_strategy_choice():
    assert _choice("llama-2-7b", 1, 80).plan.run.strategy == "single"
    assert _choice("llama-2-7b", 1, 80).plan.run.method == "lora"
    seventy = _choice("llama-2-70b", 8, 80, base_dtype="bf16").plan.run
    assert (seventy.strategy, seventy.method) == ("fsdp", "lora")
    small = _choice("llama-2-70b", 1, 48).plan.run
    assert small.method == "qlora" or small.activation_offload
    assert _choice("llama-2-70b", 1, 24).plan is None
    assert _choice("llama-2-7b", 4, 80).plan.run.strategy == "ddp"


def test_commands_use_the_train_flags():
    fsdp = _choice("llama-2-70b", 8, 80, base_dtype="bf16")
    text = command(fsdp.plan, "llama-2-70b", Run())
    assert text.startswith("torchrun --nproc-per-node 8 -m deltatune train --distributed fsdp")
    assert "--batch-size 1 --data.max-seq-len 2048" in text
    q = command(_choice("llama-2-70b", 1, 80).plan, "/models/llama", Run())
    assert q.startswith("deltatune train --model /models/llama") and "--quantize nf4" in q


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 10 ** 9), ("24GiB", 24 * GiB), ("512 MiB", 512 * 2 ** 20),
                                           ("48", 48 * 10 ** 9)])
def test_memory_strings(text, expected):
    assert parse_memory(text) == expected


def test_a_bad_gpu_memory_names_the_field(capsys):
    from deltatune.cli import main

    assert main(["plan", "--model", "llama-2-7b", "--gpus", "1", "--gpu-memory", "eighty"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory" in err and "eighty" in err


def test_the_plan_command_prints_every_term(capsys, tmp_path):
    from deltatune.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "llama-2-13b", "--gpus", "2", "--gpu-memory", "48GB", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for term in ("runtime", "base weights", "adapter weights", "gradients", "optimizer states", "activations",
                 "working set", "tokens/s", "command:"):
        assert term in text
    result = json.loads(out.read_text())
    assert result["peak_mib"] == pytest.approx(sum(result["memory_mib"].values()))
    assert set(PRESETS) >= {"llama-2-7b", "llama-2-13b", "llama-2-70b"}


def test_the_readme_shows_the_planners_table_as_it_plans_today():
    """The README's what-fits-where table is the planner's output, not a copy that drifted."""
    from pathlib import Path

    from deltatune.distributed.plan_table import table_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert table_markdown() in readme


def test_each_part_of_a_step_runs_at_its_own_rate():
    """The adapter's rank-r products and attention are timed at rates of their own on a CPU: a
    step's matmul seconds add each part's FLOPs over its rate."""
    from deltatune.distributed.plan_speed import StepCost, tokens_per_second

    cost = StepCost({"base forward": 4e9, "adapter forward + backward": 1e9, "attention": 1e9, "DoRA norms": 1e9},
                    {"element-wise ops": 2e9}, tokens=100)
    per_s, compute, traffic = tokens_per_second(cost, 4e9, 1e9, low_rank_flops=1e9, attention_flops=0.5e9)
    assert compute == pytest.approx(1 + 1 + 2 + 1) and traffic == pytest.approx(2)
    assert per_s == pytest.approx(100 / 7)
    same, compute_same, _ = tokens_per_second(cost, 4e9, 1e9)  # a GPU plan: one matmul rate for all
    assert compute_same == pytest.approx(7e9 / 4e9) and same > per_s


def test_cpu_rates_are_measured_at_the_models_shapes():
    from deltatune.distributed.plan_shapes import load_shape
    from deltatune.distributed.plan_speed import measure_cpu

    shape = load_shape("")
    counts = shape.linear_shapes()
    assert sum(counts.values()) == 7 and counts[(shape.hidden, shape.intermediate)] == 2  # gate and up
    rates = measure_cpu({(64, 128): 2, (128, 64): 1}, rows=64, r=4, repeats=1, attention_shape=(1, 2, 1, 32, 16))
    assert all(0 < rate < 1e15 for rate in (rates.matmul, rates.low_rank, rates.bandwidth, rates.attention))


def test_a_cpu_plan_times_one_block_and_adds_the_head_from_the_roofline():
    from deltatune.distributed.plan_block import BlockTimer
    from deltatune.distributed.plan_shapes import ModelShape
    from deltatune.distributed.plan_speed import CpuRates

    shape = ModelShape("tiny", hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2, head_dim=8, vocab=300,
                       tied=True)
    run = Run(rows=2, seq_len=16)
    rates = CpuRates(1e10, 1e9, 1e9, 1e9)
    timer = BlockTimer(shape)
    plan = make_plan(shape, run, None, 0, rates, timer)
    s = plan.speed
    assert s["block_seconds_measured"] > 0 and len(timer.seconds) == 1
    assert plan.tokens_per_s == pytest.approx(32 / (3 * s["block_seconds_measured"] + s["seconds_in_head_and_loss"]))
    assert s["roofline_tokens_per_s_per_rank"] != plan.tokens_per_s  # the roofline is kept beside it
    sharded = make_plan(shape, dataclasses.replace(run, strategy="fsdp", world=2), None, 0, rates, timer)
    assert len(timer.seconds) == 1  # the strategy does not change a block's time: it is timed once
    assert sharded.tokens_per_s == pytest.approx(2 * plan.tokens_per_s)
    slow = make_plan(shape, run, None, 0, CpuRates(1.0, 1.0, 1.0), BlockTimer(shape))
    assert "block_seconds_measured" not in slow.speed  # too slow to time by the roofline: roofline alone


@pytest.mark.parametrize("method,checkpointing", [("dora", False), ("qlora", True), ("qdora", False), ("full", False)])
def test_a_block_of_every_method_can_be_timed(method, checkpointing):
    from deltatune.distributed.plan_block import block_seconds
    from deltatune.distributed.plan_shapes import ModelShape

    shape = ModelShape("tiny", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=300,
                       tied=True)
    assert block_seconds(shape, Run(method=method, rows=2, seq_len=32, gradient_checkpointing=checkpointing),
                         repeats=1) > 0
