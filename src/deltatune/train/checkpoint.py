"""Resumable checkpoints: ``checkpoint-<step>/`` folders written atomically and verified on load.

A checkpoint is written into a temporary folder, each file fsynced, a ``complete.json`` with
every file's SHA-256 written last, and the folder renamed into place. On resume the newest
folder whose files match their recorded hashes is used; an incomplete or corrupt one is
reported and skipped, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..files import install_folder, settle_files, staging_dir, write_atomically
from ..io import save_adapter

MARKER = "complete.json"
STATE = "trainer_state.pt"
TRAINED = "trained_tensors.safetensors"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, model, trainer_state: dict, config_text: str,
                    keep: int = 2) -> Path:
    """Write ``checkpoint-<step>`` atomically; keep the newest ``keep`` checkpoints."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = staging_dir(output_dir, prefix=f".checkpoint-{step}.")
    try:
        save_adapter(model, tmp / "adapter", name="default")  # the PEFT folder, for users
        # every trained tensor as it lives in the model (an AdaLoRA file holds only kept ranks)
        save_file({n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters()
                   if p.requires_grad}, str(tmp / TRAINED))
        torch.save(trainer_state, tmp / STATE)
        (tmp / "config.yaml").write_text(config_text)
        seal_checkpoint(tmp, final, step, keep)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def seal_checkpoint(tmp: Path, final: Path, step: int, keep: int) -> None:
    """Make the filled staging folder ``tmp`` the checkpoint ``final``: files settled, their hashes
    in ``complete.json`` written last, the folder renamed into place; then keep the newest ``keep``."""
    files = {str(f.relative_to(tmp)): file_sha256(f) for f in settle_files(tmp)}
    write_atomically(tmp / MARKER, lambda p: Path(p).write_text(json.dumps({"step": step, "files": files}, indent=1)))
    install_folder(tmp, final)
    for _, old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in output_dir.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    return sorted(found)


def verify(folder: Path) -> Optional[str]:
    """None when ``folder`` is a complete, unaltered checkpoint; otherwise what is wrong."""
    marker = folder / MARKER
    if not marker.is_file():
        return "incomplete (no complete.json)"
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "complete.json is unreadable"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its recorded hash"
    return None


def latest_valid(output_dir: Path, log=print) -> Optional[Path]:
    """The newest checkpoint that verifies; bad ones are reported and skipped."""
    for step, folder in reversed(list_checkpoints(output_dir)):
        problem = verify(folder)
        if problem is None:
            return folder
        log(f"skipping {folder}: {problem}")
    return None


def load_checkpoint(folder: Path, model) -> dict:
    """Put the checkpoint's trained tensors into ``model`` and return the trainer state."""
    saved = load_file(str(folder / TRAINED))
    current = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in saved):
        raise ValueError(f"{folder}: the checkpoint's trained tensors do not match this run's adapter "
                         "(was it written with other adapter settings?)")
    with torch.no_grad():
        for key, value in saved.items():
            current[key].copy_(value.to(current[key].device, current[key].dtype))
    return torch.load(folder / STATE, weights_only=True)
