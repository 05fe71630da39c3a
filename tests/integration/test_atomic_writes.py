"""Fault injection on every write path a user relies on: the writer fails at each step in turn
(and, once, is killed with SIGKILL at random moments), and a reader then finds the old version
or the new one, never a mix: an adapter folder never holds new weights beside an old config,
a checkpoint folder is complete or absent, metrics and reports are whole files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune import files
from deltatune.files import write_text_atomically
from deltatune.train.checkpoint import STATE, latest_valid, list_checkpoints, save_checkpoint, verify
from tiny_models import randomize_adapter, tiny_model

TESTS = Path(__file__).resolve().parents[1]


class InjectedFault(Exception):
    pass


class FaultInjector:
    """Counts every file-system step of ``deltatune.files`` and of the writers it calls, and
    fails the ``fail_at``-th one."""

    STEPS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "fsync"), (os, "chmod"),
             (files, "exchange_paths"), (files, "settle_files"), (files, "fsync_dir"), (files, "staging_dir")]

    def __init__(self, monkeypatch, fail_at: int):
        self.count, self.fail_at = 0, fail_at
        for owner, name in self.STEPS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def step(*args, **kwargs):
            self.count += 1
            if self.count == self.fail_at:
                raise InjectedFault(f"step {self.count}: {fn.__name__}")
            return fn(*args, **kwargs)
        return step


def _each_step(monkeypatch, write, check):
    """Run ``write`` failing at step 1, 2, ... until it completes; ``check(completed)`` after each."""
    for fail_at in range(1, 200):
        with monkeypatch.context() as patch:
            injector = FaultInjector(patch, fail_at)
            try:
                write()
                completed = True
            except InjectedFault:
                completed = False
        check(completed)
        if completed:
            return fail_at - 1  # the number of steps a complete write took
    raise AssertionError("the write never completed")


def _adapter(r: int, seed: int):
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model, seed=seed)
    return model


def _read(folder: Path):
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    return config["r"], tensors


@pytest.mark.parametrize("one_step_swap", [True, False], ids=["exchange", "file-by-file"])
def test_an_adapter_folder_is_replaced_as_a_unit(tmp_path, monkeypatch, one_step_swap):
    folder = tmp_path / "adapter"
    old, new = _adapter(2, seed=1), _adapter(4, seed=2)
    dt.save_adapter(old, folder)
    (folder / "README.md").write_text("the user's notes\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "run.txt").write_text("kept\n")
    old_state, new_state = _read(folder), None
    dt.save_adapter(new, tmp_path / "reference")
    new_state = _read(tmp_path / "reference")
    if not one_step_swap:
        monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)

    def check(completed):
        if not folder.exists():  # only between the two renames of the fallback: absent, never mixed
            assert not one_step_swap and not completed
            aside = next(tmp_path.glob(".adapter.old.*"))
            aside.rename(folder)  # what a user finds there is the old folder, whole
        r, tensors = _read(folder)
        expected = new_state if completed else (old_state if r == 2 else new_state)
        assert r == expected[0]
        assert tensors.keys() == expected[1].keys()
        assert all(torch.equal(tensors[k], expected[1][k]) for k in tensors)  # never new weights, old config
        assert (folder / "README.md").read_text() == "the user's notes\n"
        assert (folder / "notes" / "run.txt").read_text() == "kept\n"
        staging = list(tmp_path.glob(".adapter.*"))
        assert not (completed and staging)  # a finished write cleans up after itself
        for leftover in staging:  # what a crash leaves: hidden, never read as the adapter
            shutil.rmtree(leftover)
        if r == 4:
            dt.save_adapter(old, folder)  # back to the old one for the next round

    steps = _each_step(monkeypatch, lambda: dt.save_adapter(new, folder), check)
    assert steps >= 8  # every step of the path was failed once


def test_a_new_adapter_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    folder = tmp_path / "fresh"
    model = _adapter(2, seed=1)

    def check(completed):
        assert folder.exists() or not completed
        if folder.exists():  # a failure after the rename leaves the finished folder
            assert _read(folder)[0] == 2
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()

    _each_step(monkeypatch, lambda: dt.save_adapter(model, folder), check)


def test_a_text_output_is_old_or_new(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text('{"old": true}')

    def check(completed):
        text = json.loads(path.read_text())
        assert text == {"new": True} if completed else text in ({"old": True}, {"new": True})
        path.write_text('{"old": true}')

    _each_step(monkeypatch, lambda: write_text_atomically(path, '{"new": true}'), check)


def test_a_checkpoint_is_complete_or_absent(tmp_path, monkeypatch):
    model = _adapter(2, seed=1)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    save_checkpoint(tmp_path, 2, model, {"step": 2}, "seed: 0\n")

    def check(completed):
        found = list_checkpoints(tmp_path)
        assert [s for s, _ in found] in ([2, 4], [2]) and (not completed or len(found) == 2)
        assert all(verify(folder) is None for _, folder in found)  # complete, every file's hash right
        assert latest_valid(tmp_path, log=lambda *_: None) == found[-1][1]
        if len(found) == 2:
            shutil.rmtree(found[-1][1])

    _each_step(monkeypatch, lambda: save_checkpoint(tmp_path, 4, model, {"step": 4}, "seed: 0\n"), check)


def test_a_checkpoint_written_again_for_the_same_step_replaces_the_old_one(tmp_path, monkeypatch):
    model = _adapter(2, seed=1)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    save_checkpoint(tmp_path, 4, model, {"step": 4, "which": "old"}, "seed: 0\n")

    def check(completed):
        [(step, folder)] = list_checkpoints(tmp_path)
        assert step == 4 and verify(folder) is None  # one whole checkpoint, old or new, never a mix
        which = torch.load(folder / STATE, weights_only=True)["which"]
        assert which == "new" if completed else which in ("old", "new")
        if which == "new":
            save_checkpoint(tmp_path, 4, model, {"step": 4, "which": "old"}, "seed: 0\n")

    _each_step(monkeypatch, lambda: save_checkpoint(tmp_path, 4, model, {"step": 4, "which": "new"}, "seed: 0\n"),
               check)


KILLED_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import deltatune as dt
from tiny_models import randomize_adapter, tiny_model
models = []
for r, seed in ((2, 1), (4, 2)):
    m = tiny_model("llama")
    dt.add_adapter(m, dt.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(m, seed=seed)
    models.append(m)
print("ready", flush=True)
i = 0
while True:
    dt.save_adapter(models[i % 2], sys.argv[2])
    i += 1
"""


def test_a_writer_killed_at_random_moments_leaves_a_whole_adapter(tmp_path):
    folder = tmp_path / "adapter"
    references = {}
    for r, seed in ((2, 1), (4, 2)):
        dt.save_adapter(_adapter(r, seed), tmp_path / f"ref{r}")
        references[r] = _read(tmp_path / f"ref{r}")[1]
    generator = torch.Generator().manual_seed(0)
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(TESTS), str(folder)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.4 * torch.rand(1, generator=generator).item())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not folder.exists():
            continue  # killed before the first save finished: nothing there, which is whole too
        r, tensors = _read(folder)
        assert all(torch.equal(tensors[k], references[r][k]) for k in references[r]), attempt
        assert tensors.keys() == references[r].keys()
