"""Adaption prompts (LLaMA-Adapter, Zhang et al. 2023, arXiv:2303.16199), in PEFT's file format.

Each of the top ``adapter_layers`` attention modules gets an ``AdaptionPrompts`` child that
holds, per adapter, ``adaption_prompt`` (1, ``adapter_len``, hidden), drawn from a standard
normal, and ``adaption_gate`` (1,), zero, and a forward hook (PyTorch's public hook API) on the
attention. After the attention has run, every token's query (Llama/Mistral: rotated by its
position, as inside the attention) attends to the prompt's keys and values, made by the
attention's own key and value projections; the result, times the gate, is added to the
attention's output (Llama/Mistral: through ``o_proj`` first; GPT-2: as is). PEFT 0.21.2
computes exactly this, so its files load here with the same outputs and the reverse. The gate
starts at zero, so a new adapter changes nothing.

The attention module itself is not replaced, so other methods still target its projections
(a LoRA on ``q_proj`` added before or after) and their file keys stay PEFT's. The prompt's keys
carry no position and never enter the KV cache, so ``generate`` needs nothing special. Each
row's extra output depends on that row alone, so rows can be routed to different adapters.
Several active adapters add their outputs (PEFT keeps one active at a time). It is not a
weight update (it is an attention over extra vectors), so it cannot be merged. File keys:
``base_model.model.<attention>.adaption_prompt`` and ``...adaption_gate``.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ...config import AdapterConfig, AdaptionPromptConfig
from ...config.prompt import ADAPTION_PROMPT_TARGETS
from ...quant.layers import QuantLinear
from ...targeting import walk_modules
from ..base import AdapterContainer, AdapterLayer
from ..method import FILE_PREFIX, Method, register_method

HOLDER_ATTR = "deltatune_adaption"  # the attention module's child that holds the prompts


def _prompt_dtype_and_device(projection: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype the prompts are kept in: the projection's compute dtype (float32 for an
    integer weight), as PEFT picks it from the weight of ``q_proj`` (GPT-2: ``c_proj``)."""
    while isinstance(projection, AdapterLayer):  # a LoRA (or other layer) on the projection
        projection = projection.base_layer
    if isinstance(projection, QuantLinear):
        return projection.compute_dtype, projection.device
    weight = projection.weight
    return (weight.dtype if weight.dtype.is_floating_point else torch.float32), weight.device


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _is_gpt2(attention: nn.Module) -> bool:
    """GPT-2 packs queries, keys and values in one projection (``c_attn``); Llama and Mistral do not."""
    return hasattr(attention, "c_attn")


class AdaptionPrompts(AdapterContainer):
    """The adaption prompts of one attention module, for every adapter that has one there."""

    stands_for_base = False

    def __init__(self) -> None:
        super().__init__()
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_plan = None
        self._handle = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adaption_prompt.keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self.adaption_prompt:
            yield self.adaption_prompt[name]
            yield self.adaption_gate[name]

    def delete_adapter(self, name: str) -> None:
        if name in self.adaption_prompt:
            del self.adaption_prompt[name]
            del self.adaption_gate[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def add(self, name: str, config: AdaptionPromptConfig, attention: nn.Module, key: str,
            from_file: bool = False) -> None:
        if name in self.adaption_prompt:
            raise ValueError(f"adapter {name!r} already exists on {key}")
        gpt2 = _is_gpt2(attention)
        dtype, device = _prompt_dtype_and_device(attention.c_proj if gpt2 else attention.q_proj)
        hidden = attention.embed_dim if gpt2 else attention.config.hidden_size
        prompt = torch.empty(1, config.adapter_len, hidden, device=device, dtype=dtype)
        if not from_file:
            prompt.normal_()  # LLaMA-Adapter's official code keeps them in an nn.Embedding (standard normal)
        self.adaption_prompt[name] = nn.Parameter(prompt)
        self.adaption_gate[name] = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))  # zero-init gate

    # ----- the hook on the attention module ---------------------------------------------------
    def attach(self, attention: nn.Module) -> None:
        self._handle = attention.register_forward_hook(_after_attention, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def add_to_output(self, attention: nn.Module, args: tuple, kwargs: dict, outputs):
        """The attention's ``outputs`` with the gated prompt attention of the active (or routed)
        adapters added to its first element."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        output, rest = outputs[0], tuple(outputs[1:])
        rotation = kwargs.get("position_embeddings")
        if self.row_plan is not None:
            for name, rows in self.row_plan.groups(hidden.shape[0], hidden.device):
                if name not in self.adaption_prompt:
                    continue
                picked = rotation
                if rotation is not None and rotation[0].shape[0] == hidden.shape[0] > 1:
                    picked = tuple(t.index_select(0, rows) for t in rotation)
                query = _query(attention, hidden.index_select(0, rows), picked)
                routed = output.index_select(0, rows) + self._prompt_output(attention, name, query).to(output.dtype)
                if torch.is_grad_enabled():
                    output = output.index_copy(0, rows, routed)
                else:  # inference: the attention's own output tensor, filled in place
                    output.index_copy_(0, rows, routed)
            return (output, *rest)
        names = [n for n in self.active_adapters if n in self.adaption_prompt]
        if not names:
            return None
        query = _query(attention, hidden, rotation)  # shared by every active adapter
        dtype = output.dtype
        for name in names:
            output = output + self._prompt_output(attention, name, query)
        return (output.to(dtype), *rest)

    def _keys_values(self, attention: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of adapter ``name``'s prompt, (1, heads, adapter_len, head_dim)."""
        prompt = self.adaption_prompt[name]
        if _is_gpt2(attention):
            _, key, value = attention.c_attn(prompt).split(attention.split_size, dim=2)
            heads = attention.num_heads
        else:
            key, value = attention.k_proj(prompt), attention.v_proj(prompt)
            heads = attention.config.num_attention_heads
        head_dim, length = attention.head_dim, prompt.shape[1]
        key = key.view(1, length, -1, head_dim).transpose(1, 2)
        value = value.view(1, length, -1, head_dim).transpose(1, 2)
        groups = heads // key.shape[1]  # grouped-query attention: each key/value head serves several queries
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        return key, value

    def _prompt_output(self, attention: nn.Module, name: str, query: torch.Tensor) -> torch.Tensor:
        """The gated attention of ``query`` over the prompt, in the attention output's layout."""
        key, value = self._keys_values(attention, name)
        dtype = query.dtype
        scores = query @ key.transpose(2, 3).to(dtype) / math.sqrt(attention.head_dim)
        # softmax in float32, then the gate on the probabilities (PEFT's order of operations)
        weights = self.adaption_gate[name] * torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        batch, _, tokens, _ = query.shape
        out = (weights @ value.to(weights.dtype)).transpose(1, 2).reshape(batch, tokens, -1)
        if not _is_gpt2(attention):
            # Through the attention's output projection, its bias included if it has one (as PEFT
            # does; Llama and Mistral have none). GPT-2's prompts skip c_proj in PEFT, so here too.
            out = attention.o_proj(out)
        return out.to(dtype)


def _after_attention(attention: nn.Module, args: tuple, kwargs: dict, outputs):
    """Forward hook of an adapted attention module. A plain function that looks its holder up,
    so a stale hook (a copied model, a removed holder) changes nothing."""
    holder = getattr(attention, HOLDER_ATTR, None)
    if not isinstance(holder, AdaptionPrompts) or holder.disabled or not holder.adaption_prompt:
        return None
    return holder.add_to_output(attention, args, kwargs, outputs)


def _query(attention: nn.Module, hidden: torch.Tensor, rotation) -> torch.Tensor:
    """The attention's queries (batch, heads, tokens, head_dim), recomputed: the attention
    module does not return them."""
    batch, tokens, _ = hidden.shape
    if _is_gpt2(attention):
        query = attention.c_attn(hidden).split(attention.split_size, dim=2)[0]
        return query.view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
    query = attention.q_proj(hidden).view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
    if rotation is None:
        raise NotImplementedError("adaption prompts need the rotary position embeddings the decoder layer "
                                  "passes to its attention (position_embeddings); this transformers version "
                                  "does not pass them")
    cos, sin = (t.unsqueeze(1) for t in rotation)
    return query * cos + _rotate_half(query) * sin


class AdaptionPromptMethod(Method):
    """Adds ``AdaptionPrompts`` (and their hook) to the top ``adapter_layers`` attention modules."""

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        assert isinstance(config, AdaptionPromptConfig)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ADAPTION_PROMPT_TARGETS:
            raise ValueError(f"AdaptionPromptConfig: model_type {model_type!r} is not supported; adaption prompts "
                             f"work on {sorted(ADAPTION_PROMPT_TARGETS)} (the architectures PEFT supports)")
        if config.adapter_len is None:
            raise ValueError("AdaptionPromptConfig.adapter_len is required (the number of prompt vectors per layer, "
                             "e.g. 10)")
        config.target_modules = config.target_modules or ADAPTION_PROMPT_TARGETS[model_type]
        found = len(_attention_modules(model, config))
        if found == 0:
            raise ValueError(f"AdaptionPromptConfig.target_modules={config.target_modules!r} matched no module of "
                             f"{type(model).__name__}")
        config.adapter_layers = config.adapter_layers or found
        if config.adapter_layers > found:
            raise ValueError(f"AdaptionPromptConfig.adapter_layers={config.adapter_layers} but "
                             f"{type(model).__name__} has {found} {config.target_modules!r} modules")

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, AdaptionPromptConfig)
        for key, attention in _attention_modules(model, config)[-config.adapter_layers:]:
            projections = ("q_proj", "k_proj", "v_proj", "o_proj")
            if not (_is_gpt2(attention) or all(hasattr(attention, p) for p in projections)):
                raise TypeError(f"adaption prompts go on an attention module with q_proj/k_proj/v_proj/o_proj (Llama, "
                                f"Mistral) or c_attn (GPT-2); {key!r} is a {type(attention).__name__}")
            holder = getattr(attention, HOLDER_ATTR, None)
            if holder is None:
                holder = AdaptionPrompts()
                attention.add_module(HOLDER_ATTR, holder)
                holder.attach(attention)
            holder.add(name, config, attention, key, from_file=from_file)
            holder.train(attention.training)

    def remove(self, model: nn.Module, name: str) -> None:
        for attention in list(model.modules()):
            holder = getattr(attention, HOLDER_ATTR, None)
            if not isinstance(holder, AdaptionPrompts):
                continue
            holder.delete_adapter(name)
            if not holder.adapter_names:
                holder.detach()
                delattr(attention, HOLDER_ATTR)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, holder in model.named_modules():
            if isinstance(holder, AdaptionPrompts) and name in holder.adaption_prompt:
                attention_key = key.rpartition(".")[0]
                out[f"{FILE_PREFIX}{attention_key}.adaption_prompt"] = holder.adaption_prompt[name]
                out[f"{FILE_PREFIX}{attention_key}.adaption_gate"] = holder.adaption_gate[name]
        return out


def _attention_modules(model: nn.Module, config: AdaptionPromptConfig) -> list[tuple[str, nn.Module]]:
    """Every module named ``*.<target_modules>``, in model order (PEFT's choice of modules)."""
    return [(k, m) for k, m in walk_modules(model) if k.endswith("." + config.target_modules)]


register_method("ADAPTION_PROMPT", AdaptionPromptMethod())
