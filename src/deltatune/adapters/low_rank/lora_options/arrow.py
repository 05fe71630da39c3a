"""Arrow (``arrow_config``): a router adapter that mixes a library of LoRA adapters per token.

The router is a LoRA adapter whose ``arrow_config`` names task adapters already on the model
(``task_adapter_names``, PEFT's ``task_0``, ``task_1``, ...). On each layer every task adapter
gets a prototype, the top right singular vector of its ``B A`` (power iteration, seeded by
``rng_seed``); each token's update is the softmax (``router_temperature``) over its ``top_k``
largest ``|x · prototype|`` of the task adapters' scaled updates, then the router's dropout.
With ``use_gks`` the mean A and B of the general adapters (``gks_adapter_names``) are first
subtracted from every task adapter's A and B, in place and once, as PEFT does. The router's own
A and B are created and saved (PEFT's file has them) but take no part.

deltatune's router follows the named adapters rather than every adapter on the layer, and
refreshes a prototype whenever its adapter's values change. Merging is refused: the mix
depends on each token.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..lora import LoraLayer, LoraLinear
from .lora_variant import LoraVariant


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor, seed: Optional[int], steps: int = 15) -> torch.Tensor:
    """The dominant eigenvector of ``Aᵀ BᵀB A`` (``B A``'s top right singular vector, up to sign)
    by power iteration, without forming ``B A``; float32."""
    A, B = A.float(), B.float()
    gram = B.T @ B
    generator = None
    if seed is not None:
        generator = torch.Generator(device=A.device.type)
        generator.manual_seed(int(seed))
    v = torch.randn(A.shape[1], dtype=A.dtype, device=A.device, generator=generator)
    v = v / (v.norm() + 1e-8)
    for _ in range(steps):
        w = A.T @ (gram @ (A @ v))
        v = w / (w.norm() + 1e-8)
    return v


class ArrowVariant(LoraVariant):
    """The router on one layer: its task and general adapters, prototypes and the GKS state."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.subtracted = False
        self._prototypes: Optional[tuple[tuple, torch.Tensor]] = None

    def _tasks(self, layer: nn.Module) -> list[str]:
        return [n for n in self.settings["task_adapter_names"] if n in layer.lora_A]

    def _general_knowledge_subtraction(self, layer: nn.Module, tasks: list[str]) -> None:
        if not self.settings["use_gks"] or self.subtracted:
            return
        general = self.settings["gks_adapter_names"] or []
        with torch.no_grad():
            mean_a = torch.stack([layer.lora_A[n].weight for n in general]).mean(0)
            mean_b = torch.stack([layer.lora_B[n].weight for n in general]).mean(0)
            for n in tasks:
                layer.lora_A[n].weight.sub_(mean_a)
                layer.lora_B[n].weight.sub_(mean_b)
        self.subtracted = True

    def prototypes(self, layer: nn.Module, tasks: list[str]) -> torch.Tensor:
        """(tasks, in) prototypes, recomputed when a task adapter's values change."""
        key = tuple((n, layer.lora_A[n].weight._version, layer.lora_B[n].weight._version) for n in tasks)
        if self._prototypes is None or self._prototypes[0] != key:
            with torch.no_grad():
                rows = [top_right_singular_vector(layer.lora_A[n].weight, layer.lora_B[n].weight,
                                                  self.settings["rng_seed"]).to(layer.lora_A[n].weight.dtype)
                        for n in tasks]
            self._prototypes = (key, torch.stack(rows))
        return self._prototypes[1]

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        tasks = self._tasks(layer)
        if not tasks:
            return result
        self._general_knowledge_subtraction(layer, tasks)
        protos = self.prototypes(layer, tasks)
        tokens = x.to(protos.dtype).reshape(-1, x.shape[-1])
        similarity = (tokens @ protos.T).abs()  # the sign of a singular vector is arbitrary
        k = min(self.settings["top_k"], len(tasks))
        best, chosen = similarity.topk(k, dim=1)
        scores = torch.full_like(similarity, float("-inf")).scatter(1, chosen, best)
        mix = torch.softmax(scores / self.settings["router_temperature"], dim=1)  # (tokens, tasks)
        A = torch.stack([layer.lora_A[n].weight for n in tasks])
        B = torch.stack([layer.lora_B[n].weight for n in tasks])
        scales = torch.tensor([layer.scaling[n] for n in tasks], device=tokens.device, dtype=tokens.dtype)
        each = torch.einsum("ter,eor->teo", torch.einsum("tf,erf->ter", tokens, A), B) * scales.view(1, -1, 1)
        delta = layer.lora_dropout[name](torch.einsum("te,teo->to", mix, each))
        return (result + delta.view(*x.shape[:-1], -1)).to(result.dtype)

    def merge_problem(self, layer: nn.Module, name: str) -> Optional[str]:
        return "it is an Arrow router (arrow_config): it mixes its task adapters per token"


def attach_arrow(model: nn.Module, name: str, settings: dict[str, Any]) -> None:
    """Make adapter ``name`` an Arrow router over the task adapters ``settings`` names."""
    wanted = list(settings["task_adapter_names"]) + list(settings["gks_adapter_names"] or [])
    for key, layer in model.named_modules():
        if not (isinstance(layer, LoraLayer) and layer.has_adapter(name)):
            continue
        if not isinstance(layer, LoraLinear):
            raise ValueError(f"LoraConfig.arrow_config: module {key!r} is a {type(layer.base_layer).__name__}; "
                             "Arrow routes over linear layers only")
        missing = [n for n in wanted if n not in layer.lora_A]
        if missing:
            raise ValueError(f"LoraConfig.arrow_config: module {key!r} holds no LoRA adapter {missing[0]!r}; add the "
                             "task (and general) adapters first, on the same modules as the router")
        layer.variants[name] = ArrowVariant(settings)
