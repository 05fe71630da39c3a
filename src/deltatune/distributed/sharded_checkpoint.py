"""Resumable checkpoints of an FSDP2 run, with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own slices of the trained tensors and of the optimizer states into
``checkpoint-<step>/sharded/`` (DCP's files and its ``.metadata``); rank 0 adds what
``train/checkpoint.py`` writes for one process (the adapter in PEFT's format, gathered from every rank,
the trainer state with every rank's RNG state, the config) and makes the folder complete the
same way: files fsynced, ``complete.json`` with their SHA-256 last, the folder renamed into
place, so a half-written checkpoint is never taken. DCP reads the slices back for any number of
ranks (it reshards), which is what lets a run resume on another world size; the frozen base is
not saved (it is the model the run loads).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..files import staging_dir
from ..io import gathered_adapter_tensors, save_adapter
from ..train.checkpoint import STATE, rng_state, seal_checkpoint
from .processes import Distributed

SHARDED = "sharded"
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)
# the frozen base is absent on purpose; every trained tensor is checked by dcp.load, which
# refuses a key the checkpoint lacks
INTO_MODEL = StateDictOptions(ignore_frozen_params=True, strict=False)


def _state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The trained tensors and optimizer states of this rank, as DCP saves and fills them."""
    return {"model": get_model_state_dict(root, options=TRAINED_ONLY),
            "optimizer": get_optimizer_state_dict(root, optimizer, options=TRAINED_ONLY)}


def is_sharded(folder: Path) -> bool:
    return (folder / SHARDED).is_dir()


def save_sharded_checkpoint(output_dir: Path, step: int, root: torch.nn.Module, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, trainer_state: dict, config_text: str,
                            dist: Distributed, keep: int = 2) -> Path:
    """Write ``checkpoint-<step>`` from every rank (a collective call); returns its path."""
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(dist.broadcast(str(staging_dir(output_dir, prefix=f".checkpoint-{step}.")) if dist.is_main else None))
    try:
        dcp.save(_state(root, optimizer), checkpoint_id=tmp / SHARDED)
        tensors = gathered_adapter_tensors(model, "default")
        ranks_rng = [None] * dist.world
        torch_dist.all_gather_object(ranks_rng, rng_state())
        if dist.is_main:
            save_adapter(model, tmp / "adapter", tensors=tensors)
            torch.save({**trainer_state, "world": dist.world, "rng_ranks": ranks_rng}, tmp / STATE)
            (tmp / "config.yaml").write_text(config_text)
        dist.barrier()  # every rank's DCP files are written before rank 0 seals the folder
        if dist.is_main:
            seal_checkpoint(tmp, final, step, keep)
    finally:
        if dist.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
    return final


def load_sharded_checkpoint(folder: Path, root: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            dist: Distributed) -> dict:
    """Fill this rank's trained tensors and optimizer states from ``folder`` (written on any
    number of ranks) and return the trainer state, with ``rng`` set to this rank's draw state
    (rank 0's when the checkpoint had fewer ranks)."""
    state = _state(root, optimizer)
    dcp.load(state, checkpoint_id=folder / SHARDED, no_dist=dist.world == 1)
    set_model_state_dict(root, state["model"], options=INTO_MODEL)
    set_optimizer_state_dict(root, optimizer, state["optimizer"], options=TRAINED_ONLY)
    trainer = torch.load(folder / STATE, weights_only=True)
    ranks = trainer.pop("rng_ranks")
    trainer["rng"] = ranks[dist.rank] if dist.rank < len(ranks) else ranks[0]
    return trainer
