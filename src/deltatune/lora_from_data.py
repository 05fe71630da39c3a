"""LoRA initialisations that read data: a few training batches decide the adapter's starting factors.

``add_lora_from_data(model, config, batches)`` adds a LoRA adapter whose ``init_lora_weights`` is
``"lora_ga"`` (LoRA-GA: the mean gradient of each targeted weight over the batches, by SVD, as PEFT's
``preprocess_loraga`` + ``get_peft_model``) or ``"eva"`` (the principal directions of each layer's
inputs, ranks redistributed by explained variance, as PEFT's ``initialize_lora_eva_weights``) or
``"corda"`` (the SVD of the weight times its input covariance, as PEFT's ``preprocess_corda``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import torch
from torch import nn

from .adapter_ops import add_adapter, delete_adapter, get_state
from .adapters.base import adapter_layers
from .adapters.low_rank.lora_inits.corda import InputCovariance, initialise_corda
from .adapters.low_rank.lora_inits.eva import ActivationMoments, distribute_ranks
from .adapters.low_rank.lora import LoraLinear
from .adapters.low_rank.lora_inits.lora_ga import initialise_lora_ga
from .adapters.method import method_for
from .config import LoraConfig
from .targeting import find_targets, pattern_value


def add_lora_from_data(model: nn.Module, config: LoraConfig, batches: Iterable[Mapping[str, torch.Tensor]],
                       name: str = "default") -> nn.Module:
    """Add LoRA adapter ``name`` initialised from ``batches`` (dicts for ``model(**batch)`` whose
    output has ``.loss``, e.g. ``input_ids`` and ``labels``); returns the model.

    The adapter first starts as a zero update (plain LoRA init), so the gradients below are the
    base model's; ``config`` is what the adapter records (``init_lora_weights`` included)."""
    if not isinstance(config, LoraConfig) or config.peft_type != "LORA":
        raise ValueError(f"add_lora_from_data takes a LoraConfig, got {type(config).__name__}")
    if config.init_lora_weights not in ("lora_ga", "eva", "corda"):
        raise ValueError(f"add_lora_from_data: init_lora_weights={config.init_lora_weights!r} does not read "
                         "data; use 'lora_ga', 'eva' or 'corda' (or dt.add_adapter for the others)")
    if config.use_dora:
        raise ValueError(f"LoraConfig: init_lora_weights={config.init_lora_weights!r} with use_dora=True is "
                         "not supported")
    if config.init_lora_weights == "eva":
        return _add_eva(model, config, list(batches), name)
    if config.init_lora_weights == "corda":
        return _add_corda(model, config, list(batches), name)
    add_adapter(model, dataclasses.replace(config, init_lora_weights=True), name)
    try:
        layers = [(key, layer) for key, layer in adapter_layers(model)
                  if isinstance(layer, LoraLinear) and layer.has_adapter(name)]
        if not layers:
            raise ValueError("init_lora_weights='lora_ga' found no linear layer among the targets")
        grads = mean_weight_gradients(model, [layer for _, layer in layers], batches)
        stored = get_state(model).configs[name]
        stored.init_lora_weights = "lora_ga"
        stored.validate()  # fills lora_ga_config with PEFT's defaults where it is missing
        for key, layer in layers:
            initialise_lora_ga(layer, name, grads[id(layer)], stored.lora_ga_config)
    except Exception:
        delete_adapter(model, name)
        raise
    return model


def mean_weight_gradients(model: nn.Module, layers: list, batches: Iterable[Mapping[str, torch.Tensor]]
                          ) -> dict[int, torch.Tensor]:
    """id(layer) -> the mean over ``batches`` of the loss gradient of each layer's base weight
    (stored layout), computed in training mode with every other parameter frozen for the pass."""
    for layer in layers:
        if layer.quantized:
            raise ValueError("init_lora_weights='lora_ga' needs full-precision gradients of the base weights; "
                             "use a model loaded without quantize= (PEFT refuses quantized layers too)")
    was_training = model.training
    requires = {id(p): p.requires_grad for p in model.parameters()}
    grads = {id(p): p.grad for p in model.parameters()}
    weights = [layer.base_layer.weight for layer in layers]
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        model.train()
        with torch.enable_grad():
            for batch in batches:
                model(**batch).loss.backward()
                count += 1
        if count == 0:
            raise ValueError("init_lora_weights='lora_ga' needs at least one batch")
        return {id(layer): w.grad.detach() / count for layer, w in zip(layers, weights)}
    finally:
        for p in model.parameters():
            p.requires_grad_(requires[id(p)])
            p.grad = grads.get(id(p))
        model.train(was_training)


def _token_rows(batch: Mapping[str, torch.Tensor], eva: dict) -> torch.Tensor:
    """(n, 2) indices of the tokens EVA reads: attended, and with a label unless label masking is off."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    if eva["use_label_mask"] and "labels" in batch:
        mask = mask & (batch["labels"] != eva["label_mask_value"])
    return mask.nonzero()


def _add_eva(model: nn.Module, config: LoraConfig, batches: list, name: str) -> nn.Module:
    """EVA: layer inputs over ``batches`` -> PCA per targeted layer -> ranks -> the adapter."""
    if not batches:
        raise ValueError("init_lora_weights='eva' needs at least one batch")
    config = dataclasses.replace(config)  # fills eva_config with PEFT's defaults
    eva = config.eva_config
    probe = dataclasses.replace(config, init_lora_weights=True)
    method_for(probe).prepare(model, probe)
    targets = [(k, m) for k, m in find_targets(model, probe) if isinstance(m, nn.Linear)
               or type(m).__name__ in ("Conv1D", "Linear4bit", "Linear8bit")]
    if not targets:
        raise ValueError("init_lora_weights='eva' found no linear layer among the targets")
    moments: dict[str, ActivationMoments] = {}
    rows = {"index": None}

    def hook_for(key: str):
        def hook(module, inputs, output):
            x = inputs[0]
            picked = x[rows["index"].T.unbind()] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            moments.setdefault(key, ActivationMoments(x.shape[-1])).add(picked)
        return hook

    handles = [module.register_forward_hook(hook_for(key)) for key, module in targets]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                rows["index"] = _token_rows(batch, eva)
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    ranks = {key: pattern_value(config.rank_pattern, key, config.r) for key, _ in targets}
    principal = {key: moments[key].principal() for key, _ in targets}
    won = distribute_ranks({key: p[1] for key, p in principal.items()}, ranks, eva["rho"])
    kept = [key for key, _ in targets if won[key] > 0]
    if not kept:
        raise ValueError("init_lora_weights='eva' gave every layer rank 0")
    rank_pattern, alpha_pattern = {}, {}
    for key in kept:
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        if won[key] != ranks[key] and eva["adjust_scaling_factors"]:
            alpha = alpha * won[key] / ranks[key]
        if won[key] != config.r:
            rank_pattern[key] = won[key]
        if alpha != config.lora_alpha:
            alpha_pattern[key] = alpha
    final = dataclasses.replace(config, target_modules=kept, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                                init_lora_weights=True)
    add_adapter(model, final, name)
    stored = get_state(model).configs[name]
    stored.init_lora_weights, stored.eva_config = "eva", eva
    by_key = dict(adapter_layers(model))
    with torch.no_grad():
        for key in kept:
            layer = by_key[key]
            components, _, singular = principal[key]
            A = components[: won[key]]
            if eva["whiten"]:
                A = A / singular[: won[key]].sqrt().unsqueeze(1)
            old_A, old_B = layer.factors(name)
            layer.set_factors(name, A, torch.zeros_like(old_B))
    return model


def _linear_targets(model: nn.Module, config: LoraConfig, init: str) -> list[tuple[str, nn.Module]]:
    """(key, module) of the linear layers ``config`` targets in ``model`` (before any adapter)."""
    probe = dataclasses.replace(config, init_lora_weights=True)
    method_for(probe).prepare(model, probe)
    targets = [(k, m) for k, m in find_targets(model, probe) if isinstance(m, nn.Linear)
               or type(m).__name__ in ("Conv1D", "Linear4bit", "Linear8bit")]
    if not targets:
        raise ValueError(f"init_lora_weights={init!r} found no linear layer among the targets")
    return targets


def _add_corda(model: nn.Module, config: LoraConfig, batches: list, name: str) -> nn.Module:
    """CorDA: input covariance of each targeted layer over ``batches`` -> SVD of W C -> the adapter."""
    if not batches:
        raise ValueError("init_lora_weights='corda' needs at least one batch")
    config = dataclasses.replace(config)  # fills corda_config with PEFT's defaults
    corda = config.corda_config
    targets = _linear_targets(model, config, "corda")
    covariances = {key: InputCovariance(corda["use_float16_for_covariance"]) for key, _ in targets}
    handles = [module.register_forward_hook(lambda m, i, o, key=key: covariances[key].add(i[0]))
               for key, module in targets]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    add_adapter(model, dataclasses.replace(config, init_lora_weights=True), name)
    try:
        stored = get_state(model).configs[name]
        stored.init_lora_weights, stored.corda_config = "corda", corda
        by_key = dict(adapter_layers(model))
        for key, _ in targets:
            initialise_corda(by_key[key], name, covariances[key].value(), corda["corda_method"])
    except Exception:
        delete_adapter(model, name)
        raise
    return model


# batches a training run reads to initialise EVA / LoRA-GA / CorDA (PEFT's examples use a handful)
INIT_BATCHES = 8


def training_init_batches(rows: list, pad_id: int, batch_size: int, packed: bool, seq2seq: bool,
                          device: torch.device, init: str, count: int = INIT_BATCHES) -> list[dict]:
    """The first ``count`` batches of ``rows`` (file order, so a resumed run reads the same ones),
    collated as training collates them; CorDA reads one row per batch, as PEFT's covariance hook
    expects one sequence per call."""
    from .data import collate

    size = 1 if init == "corda" else batch_size
    picked = rows[: count * size]
    batches = [collate(picked[i:i + size], pad_id, packed, seq2seq) for i in range(0, len(picked), size)]
    # a LoRA never picks weights by task: a task id column's ids stay out of its forward
    return [{k: v.to(device) for k, v in batch.items() if k != "task_ids"} for batch in batches]
