"""Writing and reading a run's resumable checkpoints: one process's format (``checkpoint.py``)
or, for an FSDP2 run, the sharded one (``distributed/sharded_checkpoint.py``), chosen by the run and checked
against the run that resumes it."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError
from ..distributed import Distributed
from ..distributed.sharded_checkpoint import is_sharded, load_sharded_checkpoint, save_sharded_checkpoint


def write_checkpoint(output_dir: Path, step: int, root: torch.nn.Module, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, state: dict, config_text: str, dist: Distributed) -> None:
    """``checkpoint-<step>``: every rank writes its shards under FSDP2, else rank 0 writes it all.
    ``state`` holds the trainer's own state (step, scheduler, ...), not the optimizer's."""
    if dist.sharded:
        save_sharded_checkpoint(output_dir, step, root, model, optimizer, state, config_text, dist)
    elif dist.is_main:
        save_checkpoint(output_dir, step, model, {**state, "optimizer": optimizer.state_dict()}, config_text)


def read_checkpoint(folder: Path, root: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    dist: Distributed, global_batch: int) -> dict:
    """Load ``folder`` into the model and optimizer; returns the trainer state. A sharded
    checkpoint resumes under FSDP2 on any number of ranks, or in one process; the rows a step
    takes (``global_batch``) must be the checkpoint's, so the data order carries on."""
    if is_sharded(folder):
        if not (dist.sharded or dist.world == 1):
            raise ConfigError(f"--resume: {folder} was written by a sharded (FSDP2) run; resume it with "
                              "distributed fsdp, on any number of processes, or in one process")
        state = load_sharded_checkpoint(folder, root, optimizer, dist)
    else:
        if dist.sharded:
            raise ConfigError(f"--resume: {folder} was written without FSDP2; resume it with distributed ddp "
                              "or in one process")
        state = load_checkpoint(folder, model)
        optimizer.load_state_dict(state["optimizer"])
    saved = state.get("global_batch", global_batch)  # checkpoints from before this field: the same run
    if saved != global_batch:
        raise ConfigError(f"--resume: this run takes {global_batch} rows a step (batch_size x processes x "
                          f"grad_accum) and {folder} was written by one taking {saved}; keep the product the same "
                          "so the data order carries on")
    return state
