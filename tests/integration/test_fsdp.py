"""FSDP2 (and DDP) under torchrun on CPU (gloo): the same training as one process, with sharded
weights, and checkpoints that resume on as many ranks or on another number.

These start several processes; ``-m "not multiprocess"`` leaves them out of a local run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train import ConfigError, load_config, train
from deltatune.train.checks import check_settings
from tiny_models import tiny_chat_model_dir, word_meaning_data

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def setup(tmp_path, default_tokenizer):
    model = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 48)
    return {"model": str(model), "data.path": str(data), "batch_size": 4, "lr": 1e-2, "lora.r": 4,
            "lora.lora_dropout": 0.0, "max_steps": 4, "eval_steps": 2, "seed": 3, "schedule": "cosine",
            "warmup_ratio": 0.0}


def _torchrun(settings: dict, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    flags = []
    for key, value in settings.items():
        flags += [f"--{key}" if value else f"--no-{key}"] if isinstance(value, bool) else [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "deltatune.cli", "train", *flags], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("method,extra", [("lora", {}), ("dora", {}), ("lora", {"gradient_checkpointing": True})],
                         ids=["lora", "dora", "lora+checkpointing"])
def test_fsdp_on_two_processes_equals_one_process(tmp_path, setup, method, extra):
    """2 ranks x 2 rows, sharded, against 1 process x 4 rows: the same steps, the same adapter."""
    same = {**setup, "method": method, **extra}
    train(load_config(None, {**same, "output_dir": str(tmp_path / "one")}), log=lambda *_: None)
    proc = _torchrun({**same, "batch_size": 2, "distributed": "fsdp", "output_dir": str(tmp_path / "two")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: fsdp over 2 processes" in proc.stdout + proc.stderr
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"FSDP2 ({method} {extra}, 2 processes) vs 1 process: worst |adapter difference| {worst:.2e}")
    assert worst < 1e-5, worst
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [0, 1, 2, 3, 4]
    assert abs(one[-1]["eval_loss"] - two[-1]["eval_loss"]) < 1e-5
    assert (tmp_path / "two" / "best_adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_reduces_once_a_step_and_equals_one_process(tmp_path, setup, strategy):
    """Batches of 1 row accumulated twice per step on 2 ranks (gradients reduced on the second
    micro-batch only): the same as 4 rows in one process."""
    same = {**setup, "group_by_length": False}  # the same rows in each step: 4 at once or 1 + 1 on each rank
    train(load_config(None, {**same, "output_dir": str(tmp_path / "one")}), log=lambda *_: None)
    proc = _torchrun({**same, "batch_size": 1, "grad_accum": 2, "distributed": strategy,
                      "output_dir": str(tmp_path / "two")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_what_fsdp_does_not_run_yet_is_refused_by_name(tmp_path, setup):
    plain = {k: v for k, v in setup.items() if not k.startswith("lora.")}  # no LoRA fields, for --method loha
    for field, value in (("compile", True), ("method", "loha"), ("quantize", "nf4"), ("auto_batch", True)):
        cfg = load_config(None, {**plain, "distributed": "fsdp", field: value, "output_dir": str(tmp_path / "x")})
        with pytest.raises(ConfigError, match=f"{field} with distributed fsdp"):
            check_settings(cfg)
    with pytest.raises(ConfigError, match="distributed"):
        check_settings(load_config(None, {**setup, "distributed": "zero3", "output_dir": str(tmp_path / "y")}))


KILLER = r"""
import json, os, signal, sys
from deltatune.train import load_config, train
def kill(info):
    if info.step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
train(load_config(None, json.loads(sys.argv[1])), on_step_end=kill, log=lambda *_: None)
"""


def _killed_at(tmp_path, settings: dict, step: int, processes: int = 2) -> None:
    """Run ``settings`` under torchrun and SIGKILL every rank's process after ``step``."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(script), json.dumps(settings), str(step)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode != 0  # it was killed


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_killed_sharded_run_resumes_bit_identical(tmp_path, setup, dropout):
    """FSDP2 on 2 ranks, checkpoints every 2 steps, SIGKILL after step 3, resumed on 2 ranks."""
    same = {**setup, "batch_size": 2, "distributed": "fsdp", "save_steps": 2, "lora.lora_dropout": dropout}
    whole = _torchrun({**same, "output_dir": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr[-3000:]
    _killed_at(tmp_path, {**same, "output_dir": str(tmp_path / "resumed")}, step=3)
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "sharded" / ".metadata").is_file() and (checkpoint / "complete.json").is_file()
    assert not (tmp_path / "resumed" / "adapter").exists()
    resumed = _torchrun({**same, "output_dir": str(tmp_path / "resumed"), "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path, setup):
    """Written by 2 ranks of 2 rows, resumed by one process of 4 rows: the same steps and data."""
    same = {**setup, "save_steps": 2}
    whole = _torchrun({**same, "batch_size": 2, "distributed": "fsdp", "output_dir": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr[-3000:]
    _killed_at(tmp_path, {**same, "batch_size": 2, "distributed": "fsdp", "output_dir": str(tmp_path / "moved")},
               step=3)
    with pytest.raises(ConfigError, match="rows a step"):  # 2 rows in one process: another data order
        train(load_config(None, {**same, "batch_size": 2, "output_dir": str(tmp_path / "moved"), "resume": True}),
              log=lambda *_: None)
    train(load_config(None, {**same, "batch_size": 4, "output_dir": str(tmp_path / "moved"), "resume": True}),
          log=lambda *_: None)
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "moved")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"FSDP2 checkpoint of 2 ranks resumed in 1 process: worst |adapter difference| {worst:.2e}")
    assert worst < 1e-5, worst
