"""The command line: help text comes from the dataclass field docs; info reports the set-up."""

import json

import pytest

from deltatune.cli import main


def test_demo_help_lists_documented_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--steps" in text and "optimizer steps" in text and "--output-dir" in text


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert {"deltatune", "torch", "transformers", "default_model"} <= set(facts)


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_merge_writes_a_plain_transformers_folder(tmp_path, capsys):
    import torch
    import transformers

    import deltatune as dt
    from tiny_models import randomize_adapter, sample_ids, saved_tiny_llama_64

    base = saved_tiny_llama_64(tmp_path / "base")
    model, _ = dt.load_model(base, quantize="nf4")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_adapter(model)
    dt.save_adapter(model, tmp_path / "adapter")
    ids = sample_ids()
    with torch.no_grad():
        tuned = model(ids).logits
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--base", str(base), "--quantize", "nf4",
                 "--dtype", "float32", "--out", str(tmp_path / "merged")]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # line 1 is the printed report
    assert summary["report"]["max_logit_diff"] <= 1e-4 * max(1.0, summary["report"]["max_abs_logit"])
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, tuned, atol=1e-4)


def test_merge_needs_an_adapter(capsys):
    assert main(["merge"]) == 2
    assert capsys.readouterr().err == "deltatune merge: error: --adapter FOLDER is required: the adapter to merge " \
                                      "into its base\n"


def _train_overrides(*flags):
    from deltatune.cli import build_parser
    from deltatune.cli.options import parse
    from deltatune.cli.train import overrides_from_args

    return overrides_from_args(parse(build_parser(), ["train", *flags]))


def test_the_short_flags_people_type_reach_the_config():
    from deltatune.train import load_config

    overrides = _train_overrides("--data", "my.jsonl", "--model", "models/m", "--method", "dora", "--lr", "2e-4",
                                 "--epochs", "2", "--batch-size", "4", "--output-dir", "runs/x")
    assert overrides == {"data.path": "my.jsonl", "model": "models/m", "method": "dora", "lr": 2e-4, "epochs": 2.0,
                         "batch_size": 4, "output_dir": "runs/x"}
    cfg = load_config(None, overrides)
    assert (cfg.data.path, cfg.lr, cfg.batch_size, cfg.data.validation_path) == ("my.jsonl", 2e-4, 4, "")
    # the dotted spelling and the underscore spelling are the same setting
    assert _train_overrides("--data.path", "a.jsonl", "--max_steps", "3") == {"data.path": "a.jsonl", "max_steps": 3}
    assert _train_overrides("--lr=1e-3")["lr"] == 1e-3


@pytest.mark.parametrize("command, typed, suggested", [
    (["train"], "--lora.rr", "--lora.r"),
    (["train"], "--max-step", "--max-steps"),
    (["eval"], "--adaptr", "--adapter"),
    (["merge"], "--requantise", "--requantize"),
])
def test_an_unknown_flag_names_the_closest_known_one(command, typed, suggested, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, typed, "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {typed} 3; did you mean {suggested}?" in err, err


def test_no_suggestion_when_nothing_is_close(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--zzzz", "1"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzz 1" in err and "did you mean" not in err


def test_a_badly_typed_flag_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--lora.r", "sixteen"])
    assert "--lora.r" in capsys.readouterr().err


def test_flags_are_never_guessed_from_a_prefix(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--max", "5"])  # once an abbreviation of --max-steps / --max-grad-norm
    assert "unrecognized arguments: --max 5" in capsys.readouterr().err


def test_flag_values_follow_the_declared_type_and_yaml_numbers():
    overrides = _train_overrides("--lora.lora-alpha", "0.5", "--max-steps", "1e3", "--adapter", "{alpha: 1e1}")
    assert overrides == {"lora.lora_alpha": 0.5, "max_steps": 1000, "adapter": {"alpha": 10.0}}
    assert isinstance(overrides["max_steps"], int)
    with pytest.raises(SystemExit):
        _train_overrides("--max-steps", "2.5")  # not a whole number of steps


def test_a_model_folder_with_pickled_weights_only_is_refused(tmp_path):
    import deltatune as dt
    from tiny_models import tiny_llama_64

    import torch

    model = tiny_llama_64()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the old pickled layout
    with pytest.raises((OSError, ValueError), match="safetensors"):
        dt.load_model(tmp_path)


def test_serve_help_and_bad_flags(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--adapter NAME=DIR", "--adapters-dir", "--api-key", "--max-batch", "--max-queue",
                 "--max-loaded-adapters", "--quantize", "--drain-timeout"):
        assert flag in help_text
    for argv, words in ((["--adapter", "nofolder"], "expected NAME=DIR"),
                        (["--adapter", f"base={tmp_path}"], "'base' names the model"),
                        (["--adapters-dir", str(tmp_path / "missing")], "no such folder"),
                        (["--batching", "sometimes"], "expected mixed or swap")):
        assert main(["serve", *argv]) == 2
        assert words in capsys.readouterr().err


def test_a_torchrun_rank_exits_with_the_commands_code_and_its_output_flushed():
    """Under torchrun the module ends with os._exit (see cli/__main__.py): output written before
    it still arrives, and the command's exit code is the process's."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WORLD_SIZE": "2", "DELTATUNE_ALLOCATOR": "system"}
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", "plan"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "fits:" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "deltatune.cli", "plan", "--labelled-share", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--labelled-share" in bad.stderr
