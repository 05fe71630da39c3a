"""Every subcommand, with each documented option missing or given a bad value, stops with one
clear line on stderr that names the option, exit code 2, no traceback, and (for training)
before any work: no output folder appears."""

import json
import re

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from tiny_models import tiny_chat_model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory, default_tokenizer):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_chat_model_dir(root / "model", default_tokenizer)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    loaded, _ = dt.load_model(model)
    dt.add_adapter(loaded, dt.LoraConfig(r=2, target_modules="all-linear"))
    dt.save_adapter(loaded, root / "adapter")
    return {"root": root, "model": str(model), "data": str(data), "adapter": str(root / "adapter")}


# tqdm progress lines ("Loading weights:  45%|...", "Generating train split: 8 examples [...]"),
# whatever postfix a transformers release adds to them
_PROGRESS = re.compile(r"\d+%\||\d+ examples \[")


def _one_line_error(capsys, command: str, args: list[str], named: str) -> None:
    try:
        code = main([command, *args])
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    err = capsys.readouterr().err
    # progress bars of model loading may come first; besides them, exactly the one error line
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert code == 2, (args, err)
    assert len(lines) == 1 and lines[0].startswith(f"deltatune {command}: error: "), err
    assert named in lines[0], (named, lines[0])
    assert "Traceback" not in err


TRAIN_BAD = [
    (["--quantize", "nf5"], "quantize"), (["--precision", "fp8"], "precision"), (["--schedule", "wobbly"], "schedule"),
    (["--optimizer", "sgdx"], "optimizer"), (["--method", "lorax"], "method"), (["--final-eval", "maybe"], "final_eval"),
    (["--lora.r", "0"], "lora.r"), (["--lora.r", "two"], "--lora.r"), (["--batch-size", "0"], "batch_size"),
    (["--epochs", "-1"], "epochs"), (["--lr", "-1"], "lr"), (["--lr", "fast"], "--lr"),
    (["--data.max-seq-len", "0"], "data.max_seq_len"), (["--data.format", "xml"], "data.format"),
    (["--adapter", "{bad: 1}"], "bad"), (["--grad-accum", "0"], "grad_accum"),
    (["--lora.lora-dropout", "1.5"], "lora.lora_dropout"), (["--data.validation-fraction", "1.5"], "validation_fraction"),
    (["--logging-steps", "0"], "logging_steps"), (["--warmup-steps", "-3"], "warmup_steps"),
    (["--save-steps", "-1"], "save_steps"), (["--eval-steps", "-1"], "eval_steps"),
    (["--config", "/no/such.yaml"], "/no/such.yaml"), (["--data", "/no/such.jsonl"], "/no/such.jsonl"),
    (["--resume"], "--resume"), (["--resume", "--overwrite"], "--overwrite"), (["--batch-siz", "4"], "--batch-size"),
    *([(["--activation-offload"], "activation_offload")] if not torch.cuda.is_available() else []),
]


@pytest.mark.parametrize("args, named", TRAIN_BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_refuses_a_bad_setting_in_one_line_before_any_work(world, tmp_path, capsys, args, named):
    out = tmp_path / "run"
    flags = ["--model", world["model"], "--data", world["data"], "--max-steps", "1", "--output-dir", str(out)]
    _one_line_error(capsys, "train", [*flags, *args], named)
    assert not out.exists()


def test_train_reports_a_missing_model_in_one_line(world, tmp_path, capsys):
    _one_line_error(capsys, "train", ["--model", str(tmp_path / "nope"), "--data", world["data"],
                                      "--output-dir", str(tmp_path / "o")], "nope")


def test_train_reports_targets_that_match_nothing_in_one_line(world, tmp_path, capsys):
    _one_line_error(capsys, "train", ["--model", world["model"], "--data", world["data"], "--max-steps", "1",
                                      "--output-dir", str(tmp_path / "o"), "--lora.target-modules", "no_such_layer"],
                    "no_such_layer")


@pytest.mark.parametrize("case", ["no data", "no adapter folder", "bad metric", "bad batch", "bad quantize",
                                  "unknown flag"])
def test_eval_refuses_bad_input_in_one_line(world, capsys, tmp_path, case):
    good = ["--adapter", world["adapter"], "--data", world["data"], "--model", world["model"],
            "--output-dir", str(tmp_path / "e")]
    args, named = {
        "no data": (["--adapter", world["adapter"]], "--data"),
        "no adapter folder": (["--adapter", str(tmp_path / "nope"), *good[2:]], "nope"),
        "bad metric": ([*good, "--metrics", "rouge,nonsense"], "nonsense"),
        "bad batch": ([*good, "--batch-size", "0"], "--batch-size"),
        "bad quantize": ([*good, "--quantize", "nf5"], "nf5"),
        "unknown flag": ([*good, "--adaptr", "x"], "--adapter"),
    }[case]
    _one_line_error(capsys, "eval", args, named)


@pytest.mark.parametrize("case", ["no adapter", "missing adapter", "bad dtype", "bad quantize", "requantize alone"])
def test_merge_refuses_bad_input_in_one_line(world, capsys, tmp_path, case):
    good = ["--adapter", world["adapter"], "--base", world["model"], "--out", str(tmp_path / "m")]
    args, named = {
        "no adapter": ([], "--adapter"),
        "missing adapter": (["--adapter", str(tmp_path / "nope"), *good[2:]], "nope"),
        "bad dtype": ([*good, "--dtype", "float8"], "float8"),
        "bad quantize": ([*good, "--quantize", "nf5"], "nf5"),
        "requantize alone": ([*good, "--requantize"], "--quantize"),
    }[case]
    _one_line_error(capsys, "merge", args, named)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command, args, named", [
    ("compare", ["--methods", "lora,bogus"], "bogus"),
    ("compare", ["--max-steps", "-1", "--methods", "lora"], "--max-steps"),
    ("demo", ["--steps", "0"], "steps"),
    ("demo", ["--rank", "0"], "rank"),
    ("demo", ["--quantize", "nf5"], "nf5"),
])
def test_compare_and_demo_refuse_bad_input_in_one_line(capsys, tmp_path, command, args, named):
    _one_line_error(capsys, command, [*args, "--output-dir", str(tmp_path / "o")], named)
    assert not (tmp_path / "o").exists()
