"""Soft prompts: prompt tuning, P-tuning and prefix tuning, for decoder-only models.

The adapters live in one ``SoftPrompts`` module attached to the model and act through two
forward hooks on it (PyTorch's public hook API; nothing of transformers is patched):

- prompt tuning / P-tuning: on a call that starts a sequence (empty cache), the learned
  embeddings go in front of the input embeddings; labels get ``-100`` and the attention mask
  ones for them. The returned logits drop the virtual positions again, so they line up
  with ``input_ids`` (PEFT returns them; deltatune does not, so code that indexes logits by
  input position keeps working).
- prefix tuning: learned keys and values for every layer are put in the KV cache before the
  first call; the real tokens then sit at positions ``n, n+1, ...`` as in PEFT.

Later ``generate`` steps only need the attention mask, ``position_ids`` and
``cache_position`` shifted by the number of virtual tokens, which the hook does, so
``generate`` works with the KV cache. Files hold one tensor, ``prompt_embeddings``: the
prompts as the model uses them (an encoder's output for P-tuning and projected prefixes),
exactly as PEFT saves them.
"""

from __future__ import annotations

import inspect
from typing import Iterator, Optional

import torch
from torch import nn

from ...config import AdapterConfig, PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig
from ..base import AdapterContainer
from ..method import Method, register_method

PROMPTS_ATTR = "deltatune_prompts"
FILE_KEY = "prompt_embeddings"


class PromptEncoder(nn.Module):
    """P-tuning's encoder (PEFT's layout): embeddings through an MLP, or a bidirectional LSTM and an MLP."""

    def __init__(self, config: PromptEncoderConfig, tokens: int):
        super().__init__()
        dim = config.token_dim
        hidden = config.encoder_hidden_size or dim
        self.embedding = nn.Embedding(tokens, dim)
        self.kind = config.encoder_reparameterization_type
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.kind == "LSTM":
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning's encoder (PEFT's layout): the raw prefix, or a projection of a smaller one."""

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        out = config.num_layers * 2 * config.token_dim
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, out))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out)
            self.transform = None

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return x if self.transform is None else self.transform(x)


class PlainPrompt(nn.Module):
    """Prompts as stored in a file: used directly, whatever encoder produced them."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.embedding = nn.Embedding(rows, cols)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class SoftPrompts(AdapterContainer):
    """Every soft-prompt adapter of a model, and the hooks that apply the active one."""

    stands_for_base = False

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.configs: dict[str, PromptLearningConfig] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_plan = None
        self._handles: list = []
        self._strip = 0  # virtual positions to drop from the logits of the current call
        self._full_length = 0
        self._loss = None  # an encoder's own loss for the current call (CPT), a function of the full logits
        self.tasks = None  # the model's TaskIds, for prompts that depend on each row's task

    @property
    def adapter_names(self) -> list[str]:
        return list(self.encoders.keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self.encoders:
            yield from self.encoders[name].parameters()

    def delete_adapter(self, name: str) -> None:
        if name in self.encoders:
            del self.encoders[name]
        self.configs.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def prompts(self, name: str) -> torch.Tensor:
        return self.encoders[name]()

    def batch_prompts(self, name: str, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, tokens, dim): the same prompts for every row, or each row's task's
        (multitask prompt tuning, whose encoder is ``task_routed``)."""
        encoder = self.encoders[name]
        if getattr(encoder, "task_routed", False):
            ids = self.tasks.for_batch(batch, device, f"multitask prompt adapter {name!r}", encoder.num_tasks)
            return encoder(ids)
        return self.prompts(name).unsqueeze(0).expand(batch, -1, -1)

    # ----- hooks -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _current(self) -> Optional[str]:
        if self.disabled:
            return None
        if self.row_plan is not None and any(n in self.encoders for n in self.row_plan.names):
            raise NotImplementedError("soft-prompt adapters cannot be routed per row (rows would differ in length)")
        names = [n for n in self.active_adapters if n in self.encoders]
        if len(names) > 1:
            raise ValueError(f"only one soft-prompt adapter can be active at a time; active: {names}")
        return names[0] if names else None

    def _before(self, model: nn.Module, args: tuple, kwargs: dict):
        name = self._current()
        self._strip, self._loss = 0, None
        if name is None:
            return None
        kwargs = dict(kwargs)
        if args:  # model(input_ids) -> keyword form
            kwargs.setdefault("input_ids", args[0])
            args = ()
        config = self.configs[name]
        n = config.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]
        cache_key = _cache_argument(model, kwargs)
        cache = kwargs.get(cache_key)
        starting = cache is None or cache.get_seq_length() == 0
        if isinstance(config, PrefixTuningConfig):
            if starting:
                kwargs[cache_key] = self._prefix_cache(model, name, config, batch, cache)
        elif starting:
            if embeds is None:
                embeds = model.get_input_embeddings()(ids)
            prompts = self.batch_prompts(name, batch, embeds.device).to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
            kwargs["input_ids"] = None
            labels = kwargs.get("labels")
            encoder = self.encoders[name]
            if hasattr(encoder, "prompt_labels"):  # CPT: the prompt's own tokens are targets, and it weighs the loss
                kwargs["labels"], self._loss = encoder.prompt_labels(labels, kwargs.pop("input_type_mask", None))
            elif labels is not None:
                kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
            self._strip = n
            self._full_length = kwargs["inputs_embeds"].shape[1]
        _shift_positions(kwargs, n, batch, prepend=self._strip > 0)
        return args, kwargs

    def _after(self, model: nn.Module, args: tuple, kwargs: dict, output):
        n, self._strip = self._strip, 0
        loss, self._loss = self._loss, None
        logits = getattr(output, "logits", None)
        if loss is not None and logits is not None:
            output.loss = loss(logits)  # on every position, the prompt's included
        # only full-length logits carry the virtual positions (generate may ask for the last one only)
        if n and logits is not None and logits.shape[1] == self._full_length:
            output.logits = logits[:, n:]
        return output

    def _prefix_cache(self, model: nn.Module, name: str, config: PrefixTuningConfig, batch: int, cache):
        from transformers import DynamicCache

        heads = config.num_attention_heads
        values = self.prompts(name).to(model.dtype)
        values = values.view(1, config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads)
        values = values.expand(batch, -1, -1, -1, -1).permute(2, 0, 3, 1, 4)  # (layers*2, batch, heads, n, head_dim)
        if cache is None:
            cache = DynamicCache(config=model.config)
        for layer in range(config.num_layers):
            cache.update(values[2 * layer], values[2 * layer + 1], layer)
        return cache


# transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name
# still works on its own but loses to ``cache`` when both are given, as ``generate`` passes it).
_CACHE_ARGUMENTS = ("cache", "past_key_values")


def _cache_argument(model: nn.Module, kwargs: dict) -> str:
    """The keyword this call carries its KV cache under, or the one ``model.forward`` takes."""
    for key in _CACHE_ARGUMENTS:
        if kwargs.get(key) is not None:
            return key
    params = inspect.signature(model.forward).parameters
    return next((key for key in _CACHE_ARGUMENTS if key in params), "past_key_values")


def _shift_positions(kwargs: dict, n: int, batch: int, prepend: bool) -> None:
    """Account for ``n`` virtual tokens in the mask and positions ``generate`` computed without them."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    positions = kwargs.get("position_ids")
    if positions is not None:
        shifted = positions + n
        if prepend:
            head = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            shifted = torch.cat([head, shifted], dim=1)
        kwargs["position_ids"] = shifted
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        kwargs["cache_position"] = (torch.cat([torch.arange(n, device=cache_position.device,
                                                            dtype=cache_position.dtype), cache_position + n])
                                    if prepend else cache_position + n)


class PromptMethod(Method):
    """Prompt tuning, P-tuning and prefix tuning (``config``'s class picks which)."""

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        assert isinstance(config, PromptLearningConfig)
        mc = model.config
        if getattr(mc, "is_encoder_decoder", False):
            raise NotImplementedError(
                f"{type(config).__name__}: deltatune's soft prompts support decoder-only models; "
                f"{type(model).__name__} is an encoder-decoder model"
            )
        heads = mc.num_attention_heads
        config.task_type = config.task_type or "CAUSAL_LM"  # PEFT needs it to apply soft prompts on load
        config.num_layers = config.num_layers or mc.num_hidden_layers
        config.num_transformer_submodules = config.num_transformer_submodules or 1
        if isinstance(config, PrefixTuningConfig):
            kv_heads = getattr(mc, "num_key_value_heads", None) or heads
            head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
            config.num_attention_heads = config.num_attention_heads or kv_heads
            config.token_dim = config.token_dim or head_dim * kv_heads
        else:
            config.num_attention_heads = config.num_attention_heads or heads
            config.token_dim = config.token_dim or mc.hidden_size

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        holder = getattr(model, PROMPTS_ATTR, None)
        if holder is None:
            holder = SoftPrompts()
            setattr(model, PROMPTS_ATTR, holder)
            holder.attach(model)
        tokens = config.num_virtual_tokens * config.num_transformer_submodules
        if from_file:
            cols = config.num_layers * 2 * config.token_dim if isinstance(config, PrefixTuningConfig) \
                else config.token_dim
            encoder: nn.Module = PlainPrompt(tokens, cols)
        elif isinstance(config, PromptEncoderConfig):
            encoder = PromptEncoder(config, tokens)
        elif isinstance(config, PrefixTuningConfig):
            encoder = PrefixEncoder(config)
        else:
            encoder = PlainPrompt(tokens, config.token_dim)
            _initialise_prompt(encoder.embedding, config, model)
        weight = model.get_input_embeddings().weight
        holder.encoders[name] = encoder.to(weight.device)
        holder.configs[name] = config
        holder.train(model.training)

    def remove(self, model: nn.Module, name: str) -> None:
        holder = getattr(model, PROMPTS_ATTR, None)
        if holder is None:
            return
        holder.delete_adapter(name)
        if not holder.adapter_names:
            holder.detach()
            delattr(model, PROMPTS_ATTR)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        encoder = getattr(model, PROMPTS_ATTR).encoders[name]
        if isinstance(encoder, PlainPrompt):
            return {FILE_KEY: encoder.embedding.weight}
        with torch.no_grad():
            return {FILE_KEY: encoder()}


def _initialise_prompt(embedding: nn.Embedding, config: PromptTuningConfig, model: nn.Module) -> None:
    words = model.get_input_embeddings().weight
    rows = embedding.weight.shape[0]
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        picks = torch.randint(0, words.shape[0], (rows,))
        embedding.weight.data.copy_(words.detach()[picks.to(words.device)].float())
    elif config.prompt_tuning_init == "TEXT":
        from transformers import AutoTokenizer

        source = config.tokenizer_name_or_path or config.base_model_name_or_path
        if not source:
            raise ValueError("PromptTuningConfig: TEXT initialisation needs tokenizer_name_or_path (a local folder)")
        ids = AutoTokenizer.from_pretrained(source, **(config.tokenizer_kwargs or {}))(
            config.prompt_tuning_init_text)["input_ids"]
        ids = (ids * (rows // max(1, len(ids)) + 1))[:rows]
        embedding.weight.data.copy_(words.detach()[torch.tensor(ids, device=words.device)].float())


register_method("PROMPT_TUNING", PromptMethod())
register_method("PREFIX_TUNING", PromptMethod())
register_method("P_TUNING", PromptMethod())
