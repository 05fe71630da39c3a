"""Cartridges: a prefix KV cache trained as it is, its first positions frozen.

It is served exactly as prefix tuning (``soft_prompts.py`` puts the keys and values in the KV
cache before the first call; ``CartridgeConfig`` is a ``PrefixTuningConfig``), but the values
are parameters rather than an encoder's output: ``CartridgeEncoder`` keeps the first
``num_frozen_tokens`` rows as a buffer (never trained, never counted as trainable) and the
rest as one parameter. Files hold ``prompt_embeddings`` (both parts, in order), as PEFT does.

``initialize_from_text`` / ``initialize_from_ids`` fill an adapter from the base model's own
KV cache of a text (the Cartridges paper's prefill initialisation), ``prefix_from_cache``
turns any single-row cache into the file layout.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...config import AdapterConfig
from ...config.prompt import CartridgeConfig
from ..base import adapter_layers
from ..method import register_method
from .soft_prompts import FILE_KEY, PROMPTS_ATTR, PromptMethod, SoftPrompts


class CartridgeEncoder(nn.Module):
    """The cache rows ``[num_virtual_tokens, num_layers * 2 * token_dim]``: frozen head, trained tail."""

    def __init__(self, config: CartridgeConfig):
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        frozen = config.num_frozen_tokens
        # drawn frozen rows first, then the trained ones (PEFT's order), standard normal
        self.register_buffer("frozen", torch.empty(frozen, width).normal_())
        self.trainable = nn.Parameter(torch.empty(config.num_virtual_tokens - frozen, width).normal_())

    def forward(self) -> torch.Tensor:
        if self.frozen.shape[0] == 0:
            return self.trainable
        return torch.cat([self.frozen.to(self.trainable.dtype), self.trainable], dim=0)

    @torch.no_grad()
    def load(self, rows: torch.Tensor) -> None:
        """Set all rows from ``rows`` (the file layout), split at ``num_frozen_tokens``."""
        expected = (self.frozen.shape[0] + self.trainable.shape[0], self.trainable.shape[1])
        if tuple(rows.shape) != expected:
            raise ValueError(f"{FILE_KEY} has shape {tuple(rows.shape)} but this cartridge needs {expected}")
        head = self.frozen.shape[0]
        self.frozen.copy_(rows[:head].to(self.frozen.device, self.frozen.dtype))
        self.trainable.copy_(rows[head:].to(self.trainable.device, self.trainable.dtype))


class CartridgeMethod(PromptMethod):
    """Prefix tuning's serving with a ``CartridgeEncoder`` (also when loading, so frozen rows stay frozen)."""

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, CartridgeConfig)
        holder = getattr(model, PROMPTS_ATTR, None)
        if holder is None:
            holder = SoftPrompts()
            setattr(model, PROMPTS_ATTR, holder)
            holder.attach(model)
        weight = model.get_input_embeddings().weight
        holder.encoders[name] = CartridgeEncoder(config).to(weight.device)
        holder.configs[name] = config
        holder.train(model.training)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {FILE_KEY: getattr(model, PROMPTS_ATTR).encoders[name]()}

    def prepare_load(self, model: nn.Module, name: str, config: AdapterConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        # the file's one tensor is split into the encoder's two parts here (the generic copy
        # then writes into file_tensors' joined copy, which changes nothing)
        if FILE_KEY in tensors:
            getattr(model, PROMPTS_ATTR).encoders[name].load(tensors[FILE_KEY])


def _layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers cache or a legacy tuple of pairs."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        cache = cache.to_legacy_cache()
    return [(k, v) for k, v, *_ in cache]


def prefix_from_cache(cache: Any, num_virtual_tokens: int) -> torch.Tensor:
    """The first ``num_virtual_tokens`` positions of a one-row KV cache in the file layout
    ``[num_virtual_tokens, num_layers * 2 * heads * head_dim]`` (per layer: keys, then values)."""
    rows = []
    for layer, (keys, values) in enumerate(_layers_of(cache)):
        for kind, t in (("keys", keys), ("values", values)):
            if t.dim() != 4 or t.shape[0] != 1:
                raise ValueError(f"layer {layer} {kind}: expected a one-row cache (1, heads, length, head_dim), "
                                 f"got {tuple(t.shape)}")
            if t.shape[2] < num_virtual_tokens:
                raise ValueError(f"the cache holds {t.shape[2]} positions; the cartridge needs {num_virtual_tokens}")
            rows.append(t[0, :, :num_virtual_tokens].transpose(0, 1).reshape(num_virtual_tokens, -1))
    if not rows:
        raise ValueError("the cache is empty")
    return torch.cat(rows, dim=1)


@torch.no_grad()
def initialize_from_ids(model: nn.Module, input_ids: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Fill cartridge ``name`` from the base model's KV cache of ``input_ids`` (one row, at least
    ``num_virtual_tokens`` long); returns the rows loaded."""
    holder = getattr(model, PROMPTS_ATTR, None)
    encoder = None if holder is None else holder.encoders[name] if name in holder.encoders else None
    if not isinstance(encoder, CartridgeEncoder):
        raise ValueError(f"adapter {name!r} is not a cartridge (CartridgeConfig) of this model")
    config = holder.configs[name]
    ids = input_ids.reshape(1, -1).to(model.get_input_embeddings().weight.device)
    layers = [layer for _, layer in adapter_layers(model) if not layer.disabled]
    try:  # the base model's cache: every adapter off for this one call (merged ones stay in the weights)
        for layer in layers:
            layer.disabled = True
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    finally:
        for layer in layers:
            layer.disabled = False
    rows = prefix_from_cache(out.past_key_values, config.num_virtual_tokens)
    encoder.load(rows)
    return rows


def initialize_from_text(model: nn.Module, tokenizer, text: str, name: str = "default",
                         use_chat_template: bool = True, max_length: Optional[int] = None) -> torch.Tensor:
    """``initialize_from_ids`` on ``text``: as a system message through the chat template when the
    tokenizer has one (PEFT's helper does the same), else tokenized plainly."""
    ids = None
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                            add_generation_prompt=False, return_dict=False)
        ids = torch.tensor(ids).reshape(1, -1)
    if ids is None:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if max_length is not None:
        ids = ids[:, :max_length]
    return initialize_from_ids(model, ids, name)


register_method("CARTRIDGE", CartridgeMethod())
