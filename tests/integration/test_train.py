"""The training loop on a tiny model: outputs, exact resume after SIGKILL, folder rules, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.data import DataError
from deltatune.train import ConfigError, load_config, train
from tiny_models import tiny_chat_model_dir, word_meaning_data

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 48)
    return {"model": str(model), "data.path": str(data), "batch_size": 4, "lr": 1e-2, "lora.r": 4,
            "lora.lora_dropout": 0.1, "max_steps": 8, "eval_steps": 4, "seed": 3,
            # the tiny model's 8 steps at 1e-2 learn with a decaying rate and no warm-up
            "schedule": "cosine", "warmup_ratio": 0.0}


def _run(tmp_path, name, **overrides):
    return train(load_config(None, {"output_dir": str(tmp_path / name), **overrides}), log=lambda *_: None)


def test_outputs_of_a_run(tmp_path, setup):
    summary = _run(tmp_path, "run", **setup)
    out = tmp_path / "run"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "best_adapter",
                 "metrics.jsonl", "loss.png", "config.yaml", "summary.json"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 9))  # step 0: the untrained adapter's validation loss
    assert all({"step", "loss", "lr"} <= set(r) for r in rows[1:])
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8]
    assert summary["initial_validation_loss"] == rows[0]["eval_loss"] > summary["final_validation_loss"]
    assert summary["steps"] == 8 and summary["final_validation_loss"] == rows[-1]["eval_loss"]
    assert summary["trainable_parameters"] < summary["total_parameters"]
    assert rows[-1]["loss"] < rows[1]["loss"]


KILLER = r"""
import os, signal, sys, json
sys.path.insert(0, sys.argv[1])
from deltatune.train import load_config, train
overrides = json.loads(sys.argv[2])
def kill(info):
    if info.step == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
train(load_config(None, overrides), on_step_end=kill, log=lambda *_: None)
"""


def test_resume_after_sigkill_is_bit_identical(tmp_path, setup):
    _run(tmp_path, "straight", save_steps=3, **setup)
    killed = {"output_dir": str(tmp_path / "killed"), "save_steps": 3, **setup}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(TESTS), json.dumps(killed), "5"],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-3").is_dir() and not (tmp_path / "killed" / "adapter").exists()
    _run(tmp_path, "killed", save_steps=3, resume=True, **setup)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 9))  # the killed run's later lines were replaced, none duplicated


def test_corrupt_checkpoints_are_skipped(tmp_path, setup, capsys):
    _run(tmp_path, "run", save_steps=3, **setup)
    out = tmp_path / "run"
    newest = out / "checkpoint-8"
    weights = newest / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    (out / "checkpoint-9").mkdir()  # half-written: no complete.json
    messages = []
    train(load_config(None, {"output_dir": str(out), "resume": True, **setup}), log=messages.append)
    assert any("checkpoint-9: incomplete" in m for m in messages)
    assert any("checkpoint-8: adapter/adapter_model.safetensors does not match" in m for m in messages)
    assert any("resumed from" in m and "checkpoint-6" in m for m in messages)


def test_output_folder_rules_keep_existing_files(tmp_path, setup):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not empty; pass --resume"):
        _run(tmp_path, "used", **setup)
    with pytest.raises(ConfigError, match="no valid checkpoint to resume"):
        _run(tmp_path, "used", resume=True, **setup)
    with pytest.raises(ConfigError, match="nothing to resume"):
        _run(tmp_path, "missing", resume=True, **setup)
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    _run(tmp_path, "empty", **{**setup, "max_steps": 1})  # an existing empty folder is fine


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['rank'\]"):
        load_config(None, {"lora.rank": 4})
    with pytest.raises(ConfigError, match="lora.r: expected an integer"):
        load_config(None, {"lora.r": "big"})
    bad = tmp_path / "run.yaml"
    bad.write_text("lr: 1e-3\nlora:\n  r: [\n")
    with pytest.raises(ConfigError, match="run.yaml: line"):
        load_config(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("lr: 0.001\nlora:\n  r: 8\ndata:\n  packing: true\n")
    cfg = load_config(str(good), {"lora.r": 32})
    assert cfg.lr == 0.001 and cfg.lora.r == 32 and cfg.data.packing is True


def test_cli_flags_reach_the_config(tmp_path, setup):
    from deltatune.cli import build_parser
    from deltatune.cli.train import overrides_from_args

    args = build_parser().parse_args(["train", "--lora.r", "32", "--max-steps", "5", "--data.packing",
                                      "--lora.target-modules", "[q_proj, v_proj]", "--model", "123"])
    overrides = overrides_from_args(args)
    assert overrides == {"lora.r": 32, "max_steps": 5, "data.packing": True,
                         "lora.target_modules": ["q_proj", "v_proj"], "model": "123"}
    cfg = load_config(None, overrides)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.multiprocess
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, setup):
    """torchrun with 2 CPU processes (gloo), 2 rows each, against 1 process with 4 rows per step."""
    # float32: under bf16 autocast the rows of a 2-row and a 4-row matmul round differently on some CPUs
    same = {**setup, "lora.lora_dropout": 0.0, "max_steps": 4, "eval_steps": 2, "precision": "fp32"}
    _run(tmp_path, "one", **same)
    flags = []
    for key, value in {**same, "batch_size": 2, "output_dir": str(tmp_path / "two")}.items():
        flags += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "deltatune.cli", "train", *flags], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"DDP (2 processes) vs 1 process: worst |adapter difference| {worst:.2e}")
    assert worst < 1e-5, worst
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [0, 1, 2, 3, 4]  # rank 0 alone wrote, once per step
    assert abs(one[-1]["eval_loss"] - two[-1]["eval_loss"]) < 1e-5


def test_gradient_checkpointing_gives_the_same_step(tmp_path, setup):
    same = {**setup, "lora.lora_dropout": 0.0, "max_steps": 2, "eval_steps": 0}
    _run(tmp_path, "plain", **same)
    _run(tmp_path, "ckpt", gradient_checkpointing=True, **same)
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cheap_recompute_trains_to_the_same_bits(tmp_path, setup, monkeypatch):
    """On by default; with dropout and bf16 autocast the adapter is bit for bit the one without it.
    The loop uses it from MIN_TOKENS positions a micro-batch: these tiny batches only when lowered."""
    from deltatune.train.recompute import CheapRecompute

    entered = []
    saving = CheapRecompute.saving
    monkeypatch.setattr(CheapRecompute, "saving", lambda self: entered.append(1) or saving(self))
    same = {**setup, "max_steps": 3, "eval_steps": 0, "precision": "bf16"}
    _run(tmp_path, "small", **same)
    assert not entered  # below MIN_TOKENS
    monkeypatch.setattr("deltatune.train.loop.RECOMPUTE_MIN_TOKENS", 0)
    _run(tmp_path, "recompute", **same)
    assert len(entered) == 3
    _run(tmp_path, "kept", cheap_recompute=False, **same)
    a = load_file(tmp_path / "recompute" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "kept" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a[next(k for k in a if "lora_B" in k)].abs().sum() > 0  # B starts at zero: it trained


def test_bf16_autocast_and_packing_run(tmp_path, setup):
    summary = _run(tmp_path, "bf16", precision="bf16", **{**setup, "max_steps": 2, "data.packing": True})
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"]) and summary["precision"] == "bf16"
    saved = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the master weights stay float32


def test_precision_auto_resolves_for_this_machine_and_is_recorded(tmp_path, setup):
    from deltatune.hardware import auto_precision

    summary = _run(tmp_path, "auto", **{**setup, "max_steps": 1})
    expected = auto_precision(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert summary["precision"] == expected
    assert f"precision: {expected}" in (tmp_path / "auto" / "config.yaml").read_text()


def test_compiled_blocks_train_to_the_eager_result(tmp_path, setup):
    """``compile: true`` compiles each transformer block, says so, and trains what eager does."""
    messages = []
    same = {**setup, "max_steps": 2, "eval_steps": 2, "final_eval": "off", "precision": "fp32"}  # bf16 rounds fused ops apart
    cfg = load_config(None, {**same, "output_dir": str(tmp_path / "compiled"), "compile": True})
    train(cfg, log=messages.append)
    _run(tmp_path, "eager", **same)
    assert any("compile: 2 transformer blocks" in m for m in messages)
    assert any(m.startswith("compile: the first step took") for m in messages)
    a = load_file(tmp_path / "eager" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "compiled" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_early_stopping(tmp_path, setup):
    messages = []
    cfg = load_config(None, {**setup, "output_dir": str(tmp_path / "early"), "lr": 1e-30, "eval_steps": 1,
                             "early_stopping_patience": 2, "max_steps": 8})
    summary = train(cfg, log=messages.append)
    # lr 1e-30 (no visible update): the validation loss never improves after the first evaluation, so two more end the run.
    assert summary["steps"] == 3 and any("early stopping at step 3" in m for m in messages)


def test_tensorboard_logs_when_installed(tmp_path, setup):
    pytest.importorskip("tensorboard")
    _run(tmp_path, "tb", **{**setup, "max_steps": 2})
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_seq2seq_t5_trains_and_saves_a_peft_adapter(tmp_path, default_tokenizer):
    from tiny_models import tiny_t5_dir

    model = tiny_t5_dir(tmp_path / "t5", default_tokenizer)
    data = tmp_path / "s2s.jsonl"
    data.write_text("".join(json.dumps({"source": f"summarize: story number {i} is long", "target": f"story {i % 4}"})
                            + "\n" for i in range(40)))
    summary = _run(tmp_path, "t5run", model=str(model), **{"data.path": str(data), "max_steps": 6, "eval_steps": 6,
                                                           "lr": 1e-2,
                                                           "lora.r": 4, "lora.target_modules": ["q", "v"],
                                                           "batch_size": 4})
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    config = json.loads((tmp_path / "t5run" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q", "v"]
    with pytest.raises(DataError, match="packing works with causal"):
        _run(tmp_path, "t5pack", model=str(model), **{"data.path": str(data), "data.packing": True, "max_steps": 1})


def test_fp16_autocast_with_loss_scaling_runs(tmp_path, setup):
    summary = _run(tmp_path, "fp16", precision="fp16", **{**setup, "max_steps": 2})
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])


def test_cli_reports_bad_input_in_one_line(tmp_path, setup, capsys):
    from deltatune.cli import main

    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "deltatune train: error:" in err and "no-such-model" in err and "Traceback" not in err
    code = main(["train", "--model", setup["model"], "--data.path", str(tmp_path / "missing.jsonl"),
                 "--output-dir", str(tmp_path / "o2")])
    assert code == 2 and "missing.jsonl" in capsys.readouterr().err


def test_default_model_and_data_end_to_end(tmp_path):
    """The default job's path, shortened: embedded model, shipped Velmar data, 3 steps."""
    summary = _run(tmp_path, "default", max_steps=3, batch_size=4, lr=1e-3, eval_max_new_tokens=6, eval_steps=3)
    assert summary["train_examples"] == 160 and summary["validation_examples"] == 40
    # The default job ends with a generation evaluation, base against tuned, on its test split:
    # 40 more animals, in neither training nor validation.
    assert set(summary["evaluation"]) == {"base", "default"} and summary["evaluation_split"] == "test"
    prompts = {json.loads(line)["prompt"] for line in (tmp_path / "default" / "eval" / "predictions.jsonl")
               .read_text().splitlines()}
    assert any("panda" in p for p in prompts) and len(prompts) == 40
    assert (tmp_path / "default" / "eval" / "report.md").is_file()
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    assert (tmp_path / "default" / "adapter" / "adapter_model.safetensors").is_file()


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, setup):
    same = {**setup, "lora.lora_dropout": 0.0, "max_steps": 3, "eval_steps": 0, "precision": "fp32",
            "group_by_length": False}  # the same rows in each step: 4 at once or 2 + 2
    _run(tmp_path, "big", **same)
    _run(tmp_path, "accum", **{**same, "batch_size": 2, "grad_accum": 2})
    a = load_file(tmp_path / "big" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "accum" / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_validation_passes_are_spaced_to_cost_little_by_default(tmp_path, setup):
    """Without eval_steps the passes are as many as the validation budget allows: here the
    validation split is as large as the training data, so only the pass at the end runs."""
    settings = {k: v for k, v in setup.items() if k != "eval_steps"}
    summary = _run(tmp_path, "curve", **{**settings, "max_steps": 20, "data.validation_fraction": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "curve" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [20]
    assert summary["validation_passes"] == 1 and summary["initial_validation_loss"] is None
    assert (tmp_path / "curve" / "loss.png").stat().st_size > 0


def test_the_default_job_validates_within_its_budget(default_tokenizer):
    """The default job's 40 validation rows against its 60 steps of 8: the estimated cost of the
    passes stays under the budget, with the pass at step 0."""
    from deltatune.data import prepare_data
    from deltatune.train.loop import DEFAULT_DATA, planned_steps
    from deltatune.train.validation import FORWARD_SHARE, VALIDATION_BUDGET, plan_validation

    cfg = load_config(None, {"data.path": str(DEFAULT_DATA / "train.jsonl"),
                             "data.validation_path": str(DEFAULT_DATA / "validation.jsonl")})
    data = prepare_data(cfg.data, default_tokenizer)
    lengths = [len(e.input_ids) for e in data.train]
    per_epoch, total = planned_steps(lengths, cfg)
    step_tokens, val_tokens = sum(lengths) / per_epoch, sum(len(e.input_ids) for e in data.validation)
    plan = plan_validation(total, step_tokens, val_tokens)
    assert (len(lengths), total) == (160, 60)  # three epochs of 8-row batches: 160 short rows are too few tokens
    assert plan.at_start  # the curve starts at the untrained adapter
    assert plan.passes(total) * FORWARD_SHARE * val_tokens <= VALIDATION_BUDGET * total * step_tokens


def test_overwrite_moves_the_earlier_run_aside_before_writing(tmp_path, setup):
    """A 6-step run, then a 4-step run with --overwrite (checkpoints every 2 steps): the folder
    holds only the new run's files, the old run is kept aside whole, and --resume continues the
    new run, not the old one."""
    from deltatune.train.checkpoint import list_checkpoints

    base = {**setup, "save_steps": 2, "eval_steps": 2}
    _run(tmp_path, "run", **{**base, "max_steps": 6})
    messages = []
    train(load_config(None, {**base, "max_steps": 4, "overwrite": True, "output_dir": str(tmp_path / "run")}),
          log=messages.append)
    out = tmp_path / "run"
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert any(f"moved the earlier run in {out} to {aside}" in m for m in messages)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert [s for s, _ in list_checkpoints(aside)] == [4, 6]
    new_steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    old_steps = [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()]
    assert max(new_steps) == 4 and max(old_steps) == 6
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    resumed = []
    train(load_config(None, {**base, "max_steps": 6, "resume": True, "output_dir": str(out)}), log=resumed.append)
    assert any(f"resumed from {out / 'checkpoint-4'} at step 4" in m for m in resumed)


def test_resume_and_overwrite_together_are_refused(tmp_path, setup):
    _run(tmp_path, "run", **{**setup, "max_steps": 1})
    with pytest.raises(ConfigError, match="give one of them"):
        _run(tmp_path, "run", **{**setup, "max_steps": 1, "resume": True, "overwrite": True})


def test_the_test_file_is_used_for_the_final_evaluation_only(tmp_path, setup):
    """Two runs that differ only in their test file train the same adapter, and each reports
    its own test file."""
    tests = []
    for i, word in enumerate(("alpha", "omega")):
        path = tmp_path / f"test{i}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"{word} {n}", "completion": "x"}) + "\n" for n in range(3)))
        tests.append(path)
    for i, path in enumerate(tests):
        _run(tmp_path, f"run{i}", **{**setup, "max_steps": 2, "final_eval": "on", "eval_max_new_tokens": 2,
                                      "data.test_path": str(path)})
    a = load_file(tmp_path / "run0" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run1" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for i, word in enumerate(("alpha", "omega")):
        rows = [json.loads(line) for line in (tmp_path / f"run{i}" / "eval" / "predictions.jsonl").read_text()
                .splitlines()]
        assert rows and all(r["prompt"].startswith(word) for r in rows)
        assert json.loads((tmp_path / f"run{i}" / "summary.json").read_text())["evaluation_split"] == "test"


def test_grouping_by_length_trains_with_less_padding(tmp_path, setup):
    short = {**setup, "max_steps": 3, "eval_steps": 0}
    plain = _run(tmp_path, "plain", group_by_length=False, **short)
    grouped = _run(tmp_path, "grouped", **short)  # the default
    assert 0 <= grouped["padding_share"] < plain["padding_share"]
    assert grouped["steps"] == 3 and math.isfinite(grouped["final_train_loss"])


def test_summary_splits_the_wall_time_into_phases(tmp_path, setup):
    from deltatune.train.timing import PHASES

    summary = _run(tmp_path, "timed", **{**setup, "max_steps": 4, "save_steps": 2})
    split = summary["time_seconds"]
    assert set(split) == {*PHASES, "other", "total"}
    assert all(split[name] > 0 for name in ("load", "data", "steps", "validation", "checkpoints"))
    assert split["final_evaluation"] == 0  # not asked for outside the default job
    assert abs(sum(split[name] for name in (*PHASES, "other")) - split["total"]) < 0.01
    assert split["total"] >= summary["seconds"] - 0.001  # the split is rounded to ms


def test_lora_plus_moves_the_b_matrices_ratio_times_as_far(tmp_path, setup):
    one_step = {**setup, "max_steps": 1, "eval_steps": 0}
    _run(tmp_path, "plain", **one_step)
    _run(tmp_path, "plus", lora_plus_ratio=16.0, **one_step)
    plain = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    plus = load_file(tmp_path / "plus" / "adapter" / "adapter_model.safetensors")
    b_keys = [k for k in plain if "lora_B" in k]
    assert b_keys
    for key in b_keys:  # B starts at zero and Adam's first step is lr-sized: 16 times the rate, 16 times the step
        assert torch.allclose(plus[key], 16 * plain[key], rtol=1e-4, atol=1e-8), key
    for key in plain:
        if "lora_A" in key:  # A's gradient is zero while B is zero: both runs leave it where it started
            assert torch.equal(plus[key], plain[key])


def test_batches_by_token_budget_and_auto_batch_run(tmp_path, setup):
    summary = _run(tmp_path, "tokens", **{**setup, "batch_tokens": 64, "data.max_seq_len": 32})
    assert summary["steps"] == 8 and math.isfinite(summary["final_train_loss"])
    summary = _run(tmp_path, "auto", **{**setup, "auto_batch": True})
    # plenty of memory for a tiny model: the whole batch in one micro-batch
    assert (summary["micro_batch"], summary["grad_accum"]) == (4, 1)


def test_token_budget_settings_are_checked(tmp_path, setup):
    with pytest.raises(ConfigError, match="batch_tokens: 100 is below data.max_seq_len"):
        _run(tmp_path, "a", **{**setup, "batch_tokens": 100})
    with pytest.raises(ConfigError, match="give one"):
        _run(tmp_path, "b", **{**setup, "batch_tokens": 1024, "auto_batch": True})


def test_auto_batch_keeps_the_effective_batch_when_memory_is_short(tmp_path, setup, monkeypatch):
    import deltatune.train.auto_batch as auto_batch

    monkeypatch.setattr(auto_batch, "available_cpu_bytes", lambda: 1)
    messages = []
    summary = train(load_config(None, {**setup, "auto_batch": True, "grad_accum": 2,
                                       "output_dir": str(tmp_path / "short")}), log=messages.append)
    assert (summary["micro_batch"], summary["grad_accum"], summary["steps"]) == (1, 8, 8)
    assert any(m.startswith("auto batch: micro-batch 1 x 8 accumulated") for m in messages)
