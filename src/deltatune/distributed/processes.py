"""One process or several under ``torchrun`` (gloo on CPU, nccl on GPU); rank 0 writes.

Several processes train either with DDP (each holds the whole model and gradients are averaged)
or with FSDP2 (``fully_shard`` per transformer block and on the root: each rank holds a slice
of every weight, adapter and optimizer state, and gathers a block's weights to run it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as torch_dist

STRATEGIES = ("auto", "ddp", "fsdp")
# auto shards when one process's copy of the weights would take more than this share of the
# memory the device has for it
AUTO_FSDP_SHARE = 0.4


def device_memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: a GPU's, or the machine's (a cgroup limit, if lower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        total = min(total, int(limit)) if limit != "max" else total
    except (OSError, ValueError):
        pass
    return total


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "single"  # single (one process), ddp or fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether weights are sharded across ranks (FSDP2): every rank then takes part in each
        forward pass and in gathering the adapter to save it."""
        return self.strategy == "fsdp"

    def choose(self, wanted: str, model_bytes: int, device_bytes: int) -> str:
        """Set and return the strategy for ``wanted`` (ddp, fsdp, or auto: FSDP2 when one copy of
        the model per process would take more than ``AUTO_FSDP_SHARE`` of the device's memory)."""
        if self.world == 1:
            self.strategy = "single"
        elif wanted == "auto":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type == "cpu" else 1
            self.strategy = "fsdp" if model_bytes * local > AUTO_FSDP_SHARE * device_bytes else "ddp"
        else:
            self.strategy = wanted
        return self.strategy

    @classmethod
    def setup(cls) -> "Distributed":
        """Read torchrun's environment; start the process group when there are several processes."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world <= 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))

    def wrap(self, model: torch.nn.Module, blocks: Iterable[torch.nn.Module] = (),
             bf16: bool = False, offload: bool = False) -> torch.nn.Module:
        """``model`` ready for this strategy: DDP-wrapped, or sharded in place with FSDP2
        (each of ``blocks`` a unit of its own, the rest in the root's; with ``bf16``, weights are
        gathered and computed in bfloat16 and gradients reduced in float32; with ``offload``, the
        shards, their gradients and so the optimizer states live in CPU memory)."""
        if self.world == 1:
            return model
        if self.sharded:
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

            policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                      else MixedPrecisionPolicy())
            # pinned pages make the copies to a GPU asynchronous; without CUDA there is nothing to pin
            placement = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
            for module in model.modules():  # 4-bit layers: packed bytes and scales become shardable
                if hasattr(module, "expose_to_sharding"):
                    module.expose_to_sharding()
            for block in blocks:
                fully_shard(block, mp_policy=policy, offload_policy=placement)
            fully_shard(model, mp_policy=policy, offload_policy=placement)
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def micro_batch(self, wrapped: torch.nn.Module, last: bool):
        """Context for one micro-batch's forward and backward: gradients are reduced across
        ranks on the last micro-batch of a step only, not on every one."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else wrapped.no_sync()

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            moved = tensor.to(self.device)
            torch_dist.all_reduce(moved)
            return moved.to(tensor.device)
        return tensor

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        return self.all_reduce_sum(torch.tensor([value], dtype=torch.float64)).item() / self.world

    def smallest(self, value: int) -> int:
        """The smallest of every rank's ``value``."""
        if self.world == 1:
            return value
        held = torch.tensor([value], device=self.device)
        torch_dist.all_reduce(held, op=torch_dist.ReduceOp.MIN)
        return int(held.item())

    def broadcast(self, obj):
        """``obj`` from rank 0 on every rank."""
        if self.world == 1:
            return obj
        holder = [obj]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def shutdown(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
