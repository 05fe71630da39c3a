"""Preference tuning (``--objective dpo|orpo``) on a tiny model: learning, the reference, memory,
exact resume after SIGKILL, and bad settings named."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import deltatune as dt
from deltatune.cli import main
from deltatune.data import DataConfig, DataError
from deltatune.data.preference import load_preference_pairs
from deltatune.evaluate.preference import pair_logps
from deltatune.train import ConfigError, load_config, train
from tiny_models import tiny_chat_model_dir, word_meaning_data

TESTS = Path(__file__).resolve().parents[1]
KILLER = (TESTS / "integration" / "test_train.py").read_text().split('KILLER = r"""')[1].split('"""')[0]
BAD = ["bad", "poor", "wrong", "awful", "ugly"]


def _pairs_file(path, count: int, start: int = 0):
    """Pairs whose chosen answer is always "good" and whose rejected answer is one of five other words."""
    records = [{"prompt": f"Word {i}:", "chosen": f" good {i % 3}", "rejected": f" {BAD[i % 5]} {i % 3}"}
               for i in range(start, start + count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def setup(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    return {"model": str(model), "data.path": _pairs_file(tmp_path / "pairs.jsonl", 48),
            "data.validation_path": _pairs_file(tmp_path / "val.jsonl", 10, start=100),
            "objective": "dpo", "batch_size": 4, "lr": 1e-2, "lora.r": 4, "lora.lora_dropout": 0.1,
            "max_steps": 8, "eval_steps": 4, "seed": 3, "schedule": "cosine", "warmup_ratio": 0.0}


def _run(tmp_path, name, **overrides):
    return train(load_config(None, {"output_dir": str(tmp_path / name), **overrides}), log=lambda *_: None)


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _base_parameters(model_dir) -> int:
    model, _ = dt.load_model(model_dir)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_runs_lower_the_loss_and_learn_the_preference(tmp_path, setup, objective):
    summary = _run(tmp_path, objective, **{**setup, "objective": objective})
    rows = _metrics(tmp_path / objective)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    first, last = evals[0], evals[-1]
    if objective == "dpo":  # the policy starts as the reference: every reward 0, the loss log 2
        assert first["eval_loss"] == pytest.approx(math.log(2)) and first["eval_reward_accuracy"] == 0.0
        assert rows[1]["loss"] == pytest.approx(math.log(2))
    assert last["eval_loss"] < first["eval_loss"] and rows[-1]["loss"] < rows[1]["loss"]
    assert first["eval_preference_accuracy"] <= 0.5 and last["eval_preference_accuracy"] == 1.0
    assert last["eval_reward_accuracy"] == 1.0 > first["eval_reward_accuracy"]
    assert last["eval_reward_margin"] > first["eval_reward_margin"]
    assert {"reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps", "chosen_reward"} <= set(rows[-1])
    if objective == "orpo":
        assert {"nll", "log_odds_ratio"} <= set(rows[-1])
    # the one base: the frozen base and the adapter, nothing else
    assert summary["total_parameters"] == _base_parameters(setup["model"]) + summary["trainable_parameters"]
    assert summary["objective"] == objective and summary["time_seconds"]["reference"] >= 0


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt_tuning"])
def test_other_methods_train_with_dpo(tmp_path, setup, method):
    """DoRA and (IA)³ start as the base (an untrained adapter changes nothing), so the first loss is
    log 2; a soft prompt changes the output from the start, and its scores come from the model's own
    forward (virtual tokens in front of the rows)."""
    overrides = {k: v for k, v in setup.items() if not k.startswith("lora.")}
    summary = _run(tmp_path, method, **{**overrides, "method": method, "max_steps": 4})
    rows = _metrics(tmp_path / method)
    if method != "prompt_tuning":
        assert summary["initial_validation_loss"] == pytest.approx(math.log(2))
    else:
        assert summary["initial_validation_loss"] != pytest.approx(math.log(2))
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    assert all(math.isfinite(r["loss"]) for r in rows[1:])


def test_init_adapter_keeps_the_sft_adapter_frozen_as_the_reference(tmp_path, setup, default_tokenizer):
    sft_data = word_meaning_data(tmp_path / "sft.jsonl", 48)
    sft = {k: v for k, v in setup.items() if k not in ("objective", "data.validation_path")}
    _run(tmp_path, "sft", **{**sft, "data.path": str(sft_data), "max_steps": 4})
    sft_adapter = tmp_path / "sft" / "adapter"
    test_file = _pairs_file(tmp_path / "test.jsonl", 6, start=200)
    dpo = {k: v for k, v in setup.items() if not k.startswith("lora.")}
    # float32, as the check below scores: under bf16 autocast (the default on CPUs with AMX) the
    # run's figures would differ from a float32 recount by bf16 rounding
    summary = _run(tmp_path, "dpo", **{**dpo, "init_adapter": str(sft_adapter), "data.test_path": test_file,
                                       "final_eval": "on", "precision": "fp32"})
    # the run starts at its reference: the SFT adapter, so every reward is 0 and the loss log 2
    assert summary["initial_validation_loss"] == pytest.approx(math.log(2))
    # the reference, scored after training, is still the SFT adapter, bit for bit: the same numbers
    # as the SFT adapter on a fresh copy of the base
    model, tok = dt.load_model(setup["model"])
    dt.load_adapter(model, sft_adapter)
    pairs, _ = load_preference_pairs(test_file, tok, DataConfig())
    sums, _ = pair_logps(model, pairs, 8, tok.pad_token_id)
    report = summary["evaluation"]
    assert report["chosen_logps_before"] == pytest.approx(sums[:, 0].mean().item(), abs=1e-5)
    assert report["rejected_logps_before"] == pytest.approx(sums[:, 1].mean().item(), abs=1e-5)
    assert report["reference"] == f"adapter {sft_adapter}"
    assert report["chosen_logps_after"] != pytest.approx(report["chosen_logps_before"], abs=1e-3)
    # the file holds the trained copy only, in the SFT adapter's layout, with other values
    start, trained = load_file(sft_adapter / "adapter_model.safetensors"), load_file(
        tmp_path / "dpo" / "adapter" / "adapter_model.safetensors")
    assert trained.keys() == start.keys() and any(not (trained[k] == start[k]).all() for k in start)
    # one base for both adapters: base + the trained adapter + its frozen copy of the same size
    adapter_size = sum(t.numel() for t in start.values())
    assert summary["trainable_parameters"] == adapter_size
    assert summary["total_parameters"] == _base_parameters(setup["model"]) + 2 * adapter_size


def test_resume_after_sigkill_is_bit_identical(tmp_path, setup):
    _run(tmp_path, "straight", save_steps=3, **setup)
    killed = {"output_dir": str(tmp_path / "killed"), "save_steps": 3, **setup}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(TESTS), json.dumps(killed), "5"],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-3").is_dir() and not (tmp_path / "killed" / "adapter").exists()
    messages = []
    train(load_config(None, {"output_dir": str(tmp_path / "killed"), "save_steps": 3, "resume": True, **setup}),
          log=messages.append)
    # the reference's numbers came from the checkpoint, not computed again
    assert "reference: the log-probabilities of 48 training and 10 validation pairs from the checkpoint" in messages
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(0, 9))
    assert [r.get("reward_margin") for r in resumed[6:]] == [r.get("reward_margin") for r in straight[6:]]


@pytest.mark.parametrize("overrides, error, message", [
    ({"beta": -1.0}, ConfigError, r"beta: -1\.0 must be above 0"),
    ({"label_smoothing": 0.5}, ConfigError, r"label_smoothing: 0\.5 must be in \[0, 0\.5\)"),
    ({"objective": "ppo"}, ConfigError, r"objective: 'ppo' is not one of sft, dpo, orpo"),
    ({"objective": "orpo", "beta": 0.5}, ConfigError, r"beta: a setting of objective dpo.*orpo_lambda"),
    ({"orpo_lambda": 0.5}, ConfigError, r"orpo_lambda: a setting of objective orpo, and this run's objective is dpo"),
    ({"data.packing": True}, ConfigError, r"data\.packing with objective dpo"),
    ({"data.format": "chat"}, ConfigError, r"data\.format: objective dpo reads preference pairs"),
    ({"init_adapter": "nowhere"}, ConfigError, r"init_adapter: nowhere is not an adapter folder"),
    ({"objective": "sft", "init_adapter": "nowhere"}, ConfigError, r"init_adapter: starts a preference run"),
    ({"objective": "sft"}, DataError, r"pairs\.jsonl: these are preference pairs.*--objective dpo"),
    ({"data.path": "SFT", "data.validation_path": ""}, DataError,
     r"sft\.jsonl: objective dpo needs preference pairs, columns \['prompt', 'chosen', 'rejected'\]"),
])
def test_bad_settings_name_the_field(tmp_path, setup, overrides, error, message):
    if overrides.get("data.path") == "SFT":
        overrides = {**overrides, "data.path": str(word_meaning_data(tmp_path / "sft.jsonl", 8))}
    with pytest.raises(error, match=message):
        _run(tmp_path, "bad", **{**setup, **overrides})


def test_the_command_line_takes_the_flags(tmp_path, setup, capsys):
    assert main(["train", "--objective", "dpo", "--beta", "-1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "beta: -1.0 must be above 0" in capsys.readouterr().err
    flags = ["--model", setup["model"], "--data", setup["data.path"], "--objective", "orpo", "--orpo-lambda", "0.2",
             "--max-steps", "1", "--batch-size", "4", "--output-dir", str(tmp_path / "cli"), "--final-eval", "off"]
    assert main(["train", *flags]) == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["objective"] == "orpo" and summary["steps"] == 1


def test_a_method_with_a_loss_term_of_its_own_is_refused(tmp_path, setup):
    # ShadowPEFT adds a supervised term to the loss; DPO and ORPO have no place for it
    plain = {k: v for k, v in setup.items() if not k.startswith("lora.")}
    with pytest.raises(ConfigError, match=r"objective dpo: --method shadow adds a supervised term"):
        _run(tmp_path, "shadow", **{**plain, "method": "shadow"})
