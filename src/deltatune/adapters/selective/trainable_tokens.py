"""Trainable tokens: train chosen rows of an embedding matrix (new or existing tokens) and nothing else.

Each adapter keeps its rows in ``trainable_tokens_delta`` (despite PEFT's name, the rows' new
values, not a difference) and a wrapped embedding returns those rows in place of the stored ones.
With tied input and output embeddings, the output head gets a layer too that shares the
embedding's row tensor, so both sides see the same trained rows (as PEFT ties them).

Files: PEFT's standalone method writes ``<module>.trainable_tokens_delta`` for every wrapped
module, the tied head included; LoRA's ``trainable_token_indices`` writes
``<module>.token_adapter.trainable_tokens_delta`` for the modules it wraps itself, not the tied
head. Merging writes the rows into the base weight (a private copy where it is tied).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig, LoraConfig, TrainableTokensConfig
from ...module_tree import replace_module
from ...targeting import find_targets, walk_modules
from ..base import AdapterContainer, AdapterLayer
from ..method import FILE_PREFIX, LayerMethod, MethodConflict, register_method

DELTA = "trainable_tokens_delta"
LORA_DELTA = "token_adapter.trainable_tokens_delta"  # LoRA files keep PEFT's wrapper attribute in the key


class TrainableTokensLayer(AdapterLayer):
    """An ``nn.Embedding`` (or a linear output head) whose chosen rows come from the adapter."""

    adapter_dict_names = (DELTA,)

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable tokens wrap an embedding (or a linear output head), not a "
                            f"{type(base_layer).__name__}")
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self.tied: set[str] = set()  # adapters whose rows belong to the input embedding's layer
        self._lookup: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, name: str, indices: list[int], init_weights: bool = True,
            shared: Optional[nn.Parameter] = None) -> None:
        """Rows ``indices`` of adapter ``name``: a copy of the current rows (``init_weights``), random
        rows, or ``shared``, the row tensor of the layer this one is tied to."""
        if name in self.trainable_tokens_delta:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        vocab = weight.shape[0]
        if max(indices) >= vocab:
            raise ValueError(f"token id {max(indices)} is out of range: the embedding has {vocab} rows "
                             "(resize the embeddings first to add new tokens)")
        if shared is not None:
            self.tied.add(name)
            rows = shared
        elif init_weights:
            rows = nn.Parameter(weight.detach()[torch.tensor(indices, device=weight.device)].clone())
        else:  # random rows, as PEFT draws them (standard normal)
            rows = nn.Parameter(torch.randn((len(indices), weight.shape[1]), dtype=weight.dtype, device=weight.device))
        self.trainable_tokens_delta[name] = rows
        self.token_indices[name] = list(indices)

    def _forget(self, name: str) -> None:
        self.token_indices.pop(name, None)
        self.tied.discard(name)
        self._lookup = {k: v for k, v in self._lookup.items() if k[0] != name}

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {DELTA: self.trainable_tokens_delta[name]}

    def _index(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, slot of every vocabulary id in the adapter's rows or -1), cached per device."""
        key = (name, device)
        if key not in self._lookup:
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=device)
            slots = torch.full((self.base_layer.weight.shape[0],), -1, dtype=torch.long, device=device)
            slots[index] = torch.arange(len(index), device=device)
            self._lookup[key] = (index, slots)
        return self._lookup[key]

    def _embed_scale(self) -> Optional[torch.Tensor]:
        """The factor a scaled embedding (Gemma 3's) multiplies its lookups by, as PEFT reads it."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, dtype=self.base_layer.weight.dtype, device=self.base_layer.weight.device)
        return scale if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        rows = self.trainable_tokens_delta[name]
        index, slots = self._index(name, result.device)
        if isinstance(self.base_layer, nn.Embedding):
            # Positions holding one of the ids take the adapter's row; selecting (rather than
            # looking up in a patched copy of the whole matrix) keeps the forward's memory small.
            pad = self.base_layer.padding_idx
            if pad is not None and torch.is_grad_enabled() and pad in self.token_indices[name]:
                # the padding row gets no gradient, as nn.Embedding (and PEFT's lookup) treat it
                rows = torch.where(index.unsqueeze(-1) == pad, rows.detach(), rows)
            slot = slots[x]
            looked_up = rows[slot.clamp(min=0)]
            scale = self._embed_scale()
            if scale is not None:
                looked_up = looked_up * scale.to(looked_up.dtype)
            return torch.where((slot >= 0).unsqueeze(-1), looked_up.to(result.dtype), result)
        # A linear head: the chosen tokens' logits move by x·(rows − stored rows). Added as a
        # difference, an untrained adapter adds exact zeros, so it leaves the logits bit for bit.
        change = rows - self.base_layer.weight.detach()[index].to(rows.dtype)
        return result.index_add(-1, index, F.linear(x.to(rows.dtype), change).to(result.dtype))

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        index, _ = self._index(name, weight.device)
        return weight.index_copy(0, index, self.trainable_tokens_delta[name].detach().to(weight.device, torch.float32))


def _wrap(model: nn.Module, key: str) -> TrainableTokensLayer:
    module = model.get_submodule(key)
    if isinstance(module, TrainableTokensLayer):
        return module
    if isinstance(module, (AdapterLayer, AdapterContainer)):
        raise MethodConflict(f"module {key!r} already holds a {type(module).__name__} adapter; trainable tokens "
                             "need the embedding itself (one method per module)")
    try:
        layer = TrainableTokensLayer(module)
    except TypeError as err:
        raise TypeError(f"module {key!r}: {err}") from None
    layer.train(module.training)
    replace_module(model, key, layer)
    return layer


def _key_of(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    return next((k for k, m in model.named_modules() if m is module), None) if module is not None else None


def input_embedding_name(model: nn.Module) -> str:
    """The input embedding's full module name (PEFT's default target), else ``embed_tokens``."""
    get = getattr(model, "get_input_embeddings", None)
    return (_key_of(model, get()) if callable(get) else None) or "embed_tokens"


def _sharing_modules(model: nn.Module, embedding_key: str) -> list[str]:
    """Other embeddings and linear heads whose weight is the input embedding's weight (a tied
    output head, T5's encoder and decoder token embeddings)."""
    embedding = model.get_submodule(embedding_key)
    weight = getattr(embedding, "base_layer", embedding).weight
    keys = []
    for key, module in walk_modules(model):
        base = getattr(module, "base_layer", module) if isinstance(module, AdapterLayer) else module
        if key != embedding_key and isinstance(base, (nn.Embedding, nn.Linear)) and base.weight is weight:
            keys.append(key)
    return keys


def add_token_rows(model: nn.Module, targets: dict[str, list[int]], name: str, init_weights: bool = True) -> None:
    """Wrap each module of ``targets`` (key -> row ids) and add adapter ``name``'s rows.

    Where the model declares tied word embeddings, every module sharing a targeted input
    embedding's weight shares its rows too, as PEFT ties them (targeting such a module as well,
    with the same ids, ties it). Without that declaration PEFT leaves them alone, and so does
    this, with a warning, since they keep reading the stored rows.
    """
    embedding_key = input_embedding_name(model)
    sharing = _sharing_modules(model, embedding_key) if embedding_key in targets else []
    declared = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    tied = [k for k in sharing if declared and (k not in targets or targets[k] == targets[embedding_key])]
    untouched = [k for k in sharing if not declared and k not in targets]
    if untouched:
        warnings.warn(f"trainable tokens: {untouched} share the weight of {embedding_key!r} but the model does not "
                      "declare tied embeddings (tie_word_embeddings), so, as in PEFT, they keep the stored rows; "
                      "target them too to train their rows")
    for key, indices in targets.items():
        if key not in tied:
            _wrap(model, key).add(name, indices, init_weights)
    for key in tied:
        rows = model.get_submodule(embedding_key).trainable_tokens_delta[name]
        _wrap(model, key).add(name, targets[embedding_key], shared=rows)


def token_tensors(model: nn.Module, name: str, attribute: str, with_tied: bool) -> dict[str, torch.Tensor]:
    """File key -> rows of adapter ``name``, under ``<module>.<attribute>``."""
    return {f"{FILE_PREFIX}{key}.{attribute}": layer.trainable_tokens_delta[name]
            for key, layer in model.named_modules()
            if isinstance(layer, TrainableTokensLayer) and name in layer.trainable_tokens_delta
            and (with_tied or name not in layer.tied)}


class TrainableTokensMethod(LayerMethod):
    """PEFT's ``TRAINABLE_TOKENS``: the targeted embeddings, plus heads tied to them."""

    def __init__(self) -> None:
        super().__init__(TrainableTokensLayer, lambda module, config, key: TrainableTokensLayer(module))

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        assert isinstance(config, TrainableTokensConfig)
        if config.target_modules is None:  # PEFT records the embedding's full name
            config.target_modules = input_embedding_name(model)

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, TrainableTokensConfig)
        keys = [key for key, _ in find_targets(model, config)]
        if not keys:
            raise ValueError(f"TrainableTokensConfig.target_modules={config.target_modules!r} matched no module "
                             f"of {type(model).__name__}")
        add_token_rows(model, {key: config.token_indices for key in keys}, name, config.init_weights)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        return token_tensors(model, name, DELTA, with_tied=True)


def lora_token_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """LoRA's ``trainable_token_indices`` as module key -> row ids: a list means the input
    embedding; a dict names modules by full name or dotted suffix."""
    spec = config.trainable_token_indices
    if not isinstance(spec, dict):
        return {input_embedding_name(model): list(spec)}
    out: dict[str, list[int]] = {}
    keys = [k for k, _ in walk_modules(model)]
    for wanted, indices in spec.items():
        found = [k for k in keys if k == wanted or k.endswith("." + wanted)]
        if not found:
            raise ValueError(f"LoraConfig.trainable_token_indices: {wanted!r} matches no module of "
                             f"{type(model).__name__}")
        out.update({k: list(indices) for k in found})
    return out


def add_lora_token_rows(model: nn.Module, config: LoraConfig, name: str) -> None:
    """The trainable rows that LoRA's ``trainable_token_indices`` asks for, beside the LoRA layers."""
    targets = lora_token_targets(model, config)
    for key in targets:
        if config.modules_to_save and any(key == m or key.endswith("." + m) for m in config.modules_to_save):
            raise ValueError(f"LoraConfig: {key!r} is in modules_to_save (trained in full) and in "
                             "trainable_token_indices (chosen rows); name it in one of them")
    add_token_rows(model, targets, name)


def lora_token_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The rows LoRA's files hold (a tied head's rows are the embedding's, written once)."""
    return token_tensors(model, name, LORA_DELTA, with_tied=False)


register_method("TRAINABLE_TOKENS", TrainableTokensMethod())
