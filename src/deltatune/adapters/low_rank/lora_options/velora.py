"""VeLoRA (``velora_config``): LoRA whose A keeps a compressed copy of its input for backward.

The forward is plain LoRA. In training, A's input is not kept for A's gradient: each token is
cut into ``num_groups`` sub-tokens (zero-padded to equal size), and each sub-token is kept as
one number, its projection on a shared unit vector ``lora_velora_embed``; backward rebuilds the
input as ``number · vector · scale`` (arXiv:2405.17991). The vector is the normalised mean
sub-token of the batch: every training step (``init_type="batch_average"``), only the first
(``"batch_average_once"``), or a fixed random one (``"random"``). PEFT's file holds the vector
as ``lora_velora_embed``; evaluation and merging are plain LoRA's.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoraLayer, LoraLinear
from .lora_variant import LoraVariant


def _sub_tokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(tokens, groups, group size) from (..., features), zero-padded to groups · group size."""
    size = -(-x.shape[-1] // groups)
    if x.shape[-1] != groups * size:
        x = F.pad(x, (0, groups * size - x.shape[-1]))
    return x.reshape(-1, groups, size)


def _unit(vector: torch.Tensor) -> torch.Tensor:
    vector = vector.float()
    norm = torch.linalg.vector_norm(vector)
    if norm == 0:  # an all-zero mean: fall back to the uniform direction
        vector = torch.ones_like(vector)
        norm = torch.linalg.vector_norm(vector)
    return vector / norm


class _CompressedLinear(torch.autograd.Function):
    """``x Aᵀ`` whose backward rebuilds ``x`` from one number per sub-token for A's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, embed: torch.Tensor, groups: int,
                scale: float) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.groups, ctx.scale = tuple(x.shape), x.dtype, groups, scale
        kept = torch.einsum("tgs,s->tg", _sub_tokens(x, groups), embed.to(x.dtype))
        ctx.save_for_backward(kept, weight, embed)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        kept, weight, embed = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad2d @ weight.to(grad2d.dtype)).reshape(ctx.shape).to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = (kept.to(grad2d.dtype).unsqueeze(-1) * embed.to(grad2d.dtype)).reshape(kept.shape[0], -1)
            rebuilt = rebuilt[:, :ctx.shape[-1]] * ctx.scale
            grad_w = (grad2d.T @ rebuilt).to(weight.dtype)
        return grad_x, grad_w, None, None, None


class VeloraVariant(LoraVariant):
    """VeLoRA on one layer: the projection vector and how it is refreshed."""

    def __init__(self, embed: torch.Tensor, groups: int, scale: float, init_type: str):
        self.embed, self.groups, self.scale, self.init_type = embed, groups, scale, init_type
        self.ready = init_type == "random"

    def _refresh(self, x: torch.Tensor) -> None:
        if self.init_type == "random" or (self.init_type == "batch_average_once" and self.ready):
            return
        with torch.no_grad():
            mean = _sub_tokens(x.detach(), self.groups).reshape(-1, self.embed.shape[0]).mean(dim=0)
            self.embed.copy_(_unit(mean).to(self.embed.dtype))
        self.ready = True

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[name], layer.lora_B[name]
        x = layer.lora_dropout[name](x)
        if layer.training and torch.is_grad_enabled():
            if self.embed.device != x.device:
                self.embed = self.embed.to(x.device)
            self._refresh(x)
            after_a = _CompressedLinear.apply(x.to(A.weight.dtype), A.weight, self.embed, self.groups, self.scale)
        else:
            after_a = A(x.to(A.weight.dtype))
        return (result + B(after_a) * layer.scaling[name]).to(result.dtype)

    def file_tensors(self, layer: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return {"lora_velora_embed": self.embed}


def attach_velora(model: nn.Module, name: str, settings: dict[str, Any]) -> None:
    """Give adapter ``name`` VeLoRA's compressed backward on every layer that holds it."""
    groups, init_type = settings["num_groups"], settings["init_type"]
    for key, layer in model.named_modules():
        if not (isinstance(layer, LoraLayer) and layer.has_adapter(name)):
            continue
        if not isinstance(layer, LoraLinear):
            raise ValueError(f"LoraConfig.velora_config: module {key!r} is a {type(layer.base_layer).__name__}; "
                             "VeLoRA adapts linear layers only")
        size = -(-layer.in_out[0] // groups)
        A = layer.lora_A[name].weight
        embed = (_unit(torch.randn(size)) if init_type == "random" else torch.zeros(size)).to(A.device, A.dtype)
        layer.variants[name] = VeloraVariant(embed, groups, settings["scale"], init_type)


def velora_variants(model: nn.Module, name: str) -> list[Optional[VeloraVariant]]:
    """The VeLoRA variants of adapter ``name`` (tests look at their vectors)."""
    return [m.variants[name] for m in model.modules()
            if isinstance(m, LoraLayer) and isinstance(m.variants.get(name), VeloraVariant)]
