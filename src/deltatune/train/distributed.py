"""One process or several under ``torchrun`` (DDP: gloo on CPU, nccl on GPU); rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

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
