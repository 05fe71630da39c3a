"""DyLoRA, and QDyLoRA on a 4-bit base: one LoRA adapter trained at every rank up to r at once.

Each training step draws one rank b, uniformly from ``r_min``..``r``, and every layer of the
adapter computes with only the first b rows of A and the first b columns of B, scaled by
alpha / b (Valipour et al., 2023), so every truncation is trained. Afterwards the rank is
chosen by measurement (``deltatune eval --ranks``) instead of by retraining: the adapter runs
cut to a rank (``set_adapter_rank``), and ``cut_to_rank`` turns its tensors into a plain LoRA
adapter of that rank in PEFT's format. The layers are LoRA's (``lora.py`` holds the rank
limit and the step's rank); this module draws the ranks and cuts the files.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
from torch import nn

from ...config import AdapterConfig, DyLoraConfig, LoraConfig
from ..base import adapter_layers
from .lora import LoraLayer
from .lora_method import LoraMethod
from ..method import register_method

# file keys of the factors, and the dimension that holds the rank
_RANK_DIMS = {"lora_A.weight": 0, "lora_embedding_A": 0, "lora_B.weight": 1, "lora_embedding_B": 1}


def rank_at_step(config: DyLoraConfig, step: int) -> int:
    """The rank training step ``step`` (0-based) computes with: a function of the seed and the
    step alone, so every process of a run and every resumed run draw the same."""
    return random.Random(f"dylora:{config.rank_seed}:{step}").randint(config.r_min, config.r)


def dylora_layers(model: nn.Module, name: str) -> Iterator[LoraLayer]:
    """The LoRA layers that hold adapter ``name``."""
    for _, layer in adapter_layers(model):
        if isinstance(layer, LoraLayer) and name in layer.adapter_names:
            yield layer


class DyLoraMethod(LoraMethod):
    """LoRA's layers and files; before each training step, the step's rank."""

    def before_step(self, model: nn.Module, name: str, config: AdapterConfig, step: int) -> None:
        assert isinstance(config, DyLoraConfig)
        rank = rank_at_step(config, step)
        for layer in dylora_layers(model, name):
            layer.step_rank[name] = rank


def check_rank(config: AdapterConfig, rank: int, what: str = "rank") -> None:
    """Refuse a cut of anything but a DyLoRA adapter, or a rank outside 1..r."""
    if not isinstance(config, DyLoraConfig):
        raise ValueError(f"{what}: only a DyLoRA adapter (peft_type DYLORA) can be cut to a rank; this one is "
                         f"{config.peft_type}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= config.r:
        raise ValueError(f"{what} must be an integer from 1 to the adapter's r={config.r}, got {rank!r}")


def cut_to_rank(config: DyLoraConfig, tensors: dict[str, torch.Tensor],
                rank: int) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The PEFT LoRA adapter of rank ``rank`` inside a DyLoRA adapter: its config, and its file
    tensors cut to the first ``rank`` components (layers of a smaller r keep theirs). PEFT
    scales a rank-b layer by alpha / b, as DyLoRA does at rank b, so the outputs are the same."""
    check_rank(config, rank)
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("peft_type", "peft_version", "r_min", "rank_seed")}
    known = {f for f in LoraConfig.__dataclass_fields__} - {"extra_fields"}
    kwargs = {k: v for k, v in fields.items() if k in known}
    kwargs["r"] = rank
    kwargs["rank_pattern"] = {k: min(v, rank) for k, v in config.rank_pattern.items()}
    lora = LoraConfig(**kwargs)
    lora.extra_fields = {k: v for k, v in config.extra_fields.items() if k not in ("r_min", "rank_seed")}
    out = {}
    for key, tensor in tensors.items():
        dim = next((d for suffix, d in _RANK_DIMS.items() if key.endswith(suffix)), None)
        if dim is not None:
            tensor = tensor.narrow(dim, 0, min(rank, tensor.shape[dim]))
        out[key] = tensor.detach().contiguous().clone()
    return lora, out


register_method("DYLORA", DyLoraMethod())
