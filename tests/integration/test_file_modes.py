"""Every file and folder a run writes gets the mode a plain ``open()``/``mkdir()`` gives under the
user's umask: atomic writes (temporary files are private) must not leave adapters, checkpoints,
metrics or evaluation outputs unreadable to other users."""

import os
import stat

import pytest

import deltatune as dt
from deltatune.quant import save_model
from deltatune.train import load_config, train
from tiny_models import randomize_adapter, saved_tiny_llama_64, tiny_chat_model_dir, word_meaning_data


@pytest.fixture
def umask():
    """Set the umask for one test and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _modes(folder):
    """{relative path: permission bits} for everything under ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


def _assert_plain(folder, file_mode, dir_mode):
    modes = _modes(folder)
    assert modes
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (dir_mode if os.path.isdir(os.path.join(folder, p)) else file_mode)}
    assert wrong == {}


def test_a_training_run_writes_readable_files(tmp_path, default_tokenizer, umask):
    umask(0o022)
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    out = tmp_path / "run"
    train(load_config(None, {"model": str(model), "data.path": str(data), "batch_size": 4, "lora.r": 2,
                             "max_steps": 4, "eval_steps": 2, "save_steps": 2, "final_eval": "on",
                             "eval_max_new_tokens": 4, "output_dir": str(out)}), log=lambda *_: None)
    written = _modes(out)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.png",
                 "summary.json", "validation.jsonl", "eval/metrics.json", "eval/predictions.jsonl",
                 "eval/report.md", "checkpoint-4/adapter/adapter_model.safetensors", "checkpoint-4/complete.json"):
        assert name in written, name
    assert written["checkpoint-4"] == 0o755 and written["adapter/adapter_config.json"] == 0o644
    _assert_plain(out, 0o644, 0o755)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_adapter_and_merged_model_files_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path / "base"))
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules="all-linear"))
    randomize_adapter(model)
    dt.save_adapter(model, tmp_path / "out" / "adapter")
    save_model(dt.unload(model, merge=True), tmp_path / "out" / "merged")  # what deltatune merge writes
    _assert_plain(tmp_path / "out", file_mode, dir_mode)
