"""Activated LoRA (aLoRA): the adapter acts only from its invocation token sequence onward.

``alora_invocation_tokens`` names a token sequence; in each row the update applies to the
positions from the start of the sequence's last occurrence to the end, and not at all in rows
without it, so the keys and values of the prompt before it are the base model's (a serving
cache can reuse them). Positions are counted from the end of the input, as PEFT counts them,
so left padding does not move them.

A forward pre-hook on the model reads each call's ``input_ids`` and stores, per aLoRA adapter,
how many of the last positions of each row are adapted. A call that continues a KV cache
(generation's decoding steps) keeps what the prompt found: rows that held the sequence adapt
every new token, the others none, as PEFT's ``generate`` does. A call without ``input_ids``
(embeddings only) runs the base model, as in PEFT.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoraLayer, LoraLinear
from .lora_variant import LoraVariant

_CONTEXT_ATTR = "_deltatune_alora"


def adapted_lengths(input_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Per row, the number of last positions from the start of ``tokens``' last occurrence to the
    end (0 where the sequence does not occur): PEFT's ``alora_offsets``."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    batch, length = input_ids.shape
    k = len(tokens)
    if length < k:
        return torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    wanted = torch.tensor(tokens, dtype=input_ids.dtype, device=input_ids.device)
    found = (input_ids.unfold(1, k, 1) == wanted).all(dim=-1)  # (batch, length - k + 1)
    starts = torch.arange(1, found.shape[1] + 1, device=input_ids.device)
    last = (found * starts).max(dim=1).values  # 1 + start of the last match, 0 for none
    return torch.where(last > 0, length - (last - 1), torch.zeros_like(last))


class ALoraContext:
    """The model-level state: each aLoRA adapter's tokens and the current call's adapted lengths."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.lengths: dict[str, Optional[torch.Tensor]] = {}
        self.handle: Any = None

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 names it ``cache``
        continuing = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        for name, tokens in self.tokens.items():
            if ids is None or ids.is_floating_point():
                self.lengths[name] = None
                continue
            new = ids.shape[-1]
            rows = 1 if ids.dim() == 1 else ids.shape[0]
            before = self.lengths.get(name)
            if continuing and before is not None and before.shape[0] == rows:
                # the prompt decided: rows that held the sequence adapt all new tokens
                self.lengths[name] = torch.where(before > 0, before + new, before)
            else:
                self.lengths[name] = adapted_lengths(ids, tokens)


class ALoraVariant(LoraVariant):
    """aLoRA on one layer: the plain LoRA update, masked to each row's adapted positions."""

    def __init__(self, context: ALoraContext):
        self.context = context

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lengths = self.context.lengths.get(name)
        if lengths is None:
            return result
        lengths = lengths.to(x.device)
        if layer.row_plan is not None and lengths.shape[0] != x.shape[0]:  # routed rows only
            rows = [r for n, r in layer.row_plan.groups(lengths.shape[0], x.device) if n == name]
            lengths = lengths.index_select(0, rows[0])
        steps = x.shape[1] if x.dim() == 3 else 1
        positions = torch.arange(steps, device=x.device)
        mask = positions >= steps - lengths.clamp(max=steps).unsqueeze(1)  # (rows, steps)
        if not bool(mask.any()):
            return result
        A, B, scale = layer.live_factors(name)
        dropped = layer.lora_dropout[name](x.to(A.dtype))
        update = F.linear(F.linear(dropped, A), B, layer.lora_B[name].bias) * scale
        mask = mask.view(*mask.shape, *([1] * (update.dim() - mask.dim())))
        if x.dim() == 2:
            mask = mask.view(-1, 1)
        return torch.where(mask, (result + update).to(result.dtype), result)

    def merge_problem(self, layer: nn.Module, name: str) -> Optional[str]:
        return ("it is an aLoRA adapter (alora_invocation_tokens): its update depends on where the invocation "
                "tokens stand in each input, which no merged weight can express")


def attach_alora(model: nn.Module, name: str, tokens: list[int]) -> None:
    """Make adapter ``name`` an aLoRA adapter on every layer that holds it, and hook the model."""
    context = getattr(model, _CONTEXT_ATTR, None)
    if context is None:
        context = ALoraContext()
        context.handle = model.register_forward_pre_hook(context.before_forward, with_kwargs=True)
        setattr(model, _CONTEXT_ATTR, context)
    context.tokens[name] = list(tokens)
    for key, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and layer.has_adapter(name):
            if not isinstance(layer, LoraLinear):
                raise ValueError(f"LoraConfig.alora_invocation_tokens: module {key!r} is a "
                                 f"{type(layer.base_layer).__name__}; aLoRA adapts linear layers only (as in PEFT)")
            layer.variants[name] = ALoraVariant(context)


def detach_alora(model: nn.Module, name: str) -> None:
    """Forget aLoRA adapter ``name``; the hook goes with the last one."""
    context = getattr(model, _CONTEXT_ATTR, None)
    if context is None:
        return
    context.tokens.pop(name, None)
    context.lengths.pop(name, None)
    if not context.tokens:
        context.handle.remove()
        delattr(model, _CONTEXT_ATTR)
