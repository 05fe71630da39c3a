"""Training on mixture-of-experts models: the ``lora.target_experts`` and ``lora.train_router``
presets, and the routers' load-balancing statistics that ``deltatune train`` logs at validation.

The presets are deltatune's own settings, not config fields: they resolve, for the loaded model,
into PEFT's fields (``target_parameters`` naming the fused expert weights; ``modules_to_save`` naming
the routers), so the saved adapter is a plain PEFT LoRA file.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from ..config import AdapterConfig, LoraConfig
from ..targeting_experts import (base_modules, convert_former_moe_targets, expert_parameters, expert_targets,
                                 router_targets)
from .config import ConfigError

# LoraOptions fields that are presets rather than LoraConfig fields
PRESET_FIELDS = ("target_experts", "train_router")


def lora_config_fields(options) -> dict:
    """The ``lora`` group's settings that are LoraConfig fields (the presets left out)."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in PRESET_FIELDS}


def apply_expert_presets(config: AdapterConfig, options, model: nn.Module,
                         log: Optional[Callable[[str], None]] = None) -> AdapterConfig:
    """``config`` with the presets of ``options`` resolved for ``model``: ``target_experts`` adds every
    fused expert weight to ``target_parameters`` (LoRA allows no dropout there, so a ``lora_dropout``
    above 0 becomes 0, said in the log); ``train_router`` adds the routers to ``modules_to_save``."""
    target_experts = getattr(options, "target_experts", False)
    train_router = getattr(options, "train_router", False)
    if not (target_experts or train_router):
        return _without_dropout_on_parameters(config, model, log)
    if not isinstance(config, LoraConfig) or config.peft_type != "LORA":
        raise ConfigError(f"lora.target_experts / lora.train_router: presets of LoRA; --method gives "
                          f"{config.peft_type}")
    say = log or (lambda _: None)
    changes: dict = {}
    if target_experts:
        names = expert_targets(model)
        if not names:
            raise ConfigError("lora.target_experts: this model has no fused expert weights (it is not a "
                              "mixture-of-experts model of transformers 5)")
        changes["target_parameters"] = list(dict.fromkeys([*(config.target_parameters or []), *names]))
        if config.lora_dropout:
            say(f"lora.target_experts: lora_dropout {config.lora_dropout:g} -> 0 (dropout cannot act on expert "
                "weights; PEFT refuses it there too)")
            changes["lora_dropout"] = 0.0
        say(f"lora.target_experts: LoRA on {', '.join(names)}")
    if train_router:
        routers = router_targets(model)
        if not routers:
            raise ConfigError("lora.train_router: this model has no router beside fused experts")
        changes["modules_to_save"] = list(dict.fromkeys([*(config.modules_to_save or []), *routers]))
        say(f"lora.train_router: {', '.join(routers)} trained in full and saved with the adapter")
    try:
        return _without_dropout_on_parameters(dataclasses.replace(config, **changes), model, log)
    except ValueError as err:
        raise ConfigError(f"lora: {err}") from None


def _without_dropout_on_parameters(config: AdapterConfig, model: nn.Module,
                                   log: Optional[Callable[[str], None]]) -> AdapterConfig:
    """``config`` with ``lora_dropout`` 0 where its targets, read as PEFT reads them on this model,
    include parameters ("all-linear" reaches the experts of Qwen3-MoE, Mixtral, OLMoE, ...): PEFT and
    deltatune refuse dropout there, and training's default dropout should not make the run fail."""
    if not isinstance(config, LoraConfig) or config.peft_type != "LORA" or not config.lora_dropout:
        return config
    probe = copy.deepcopy(config)
    convert_former_moe_targets(model, probe)
    if not probe.target_parameters:
        return config
    (log or (lambda _: None))(f"lora: the targets reach parameters on this model ({', '.join(probe.target_parameters)}"
                              f"), where dropout cannot act: lora_dropout {config.lora_dropout:g} -> 0")
    return dataclasses.replace(config, lora_dropout=0.0)


class RouterLoad:
    """Tokens per expert in every MoE layer, counted from the experts' own inputs (the chosen top-k
    expert ids) in forward passes outside training mode, i.e. validation; ``take`` summarises and
    restarts the count. Routing here is dropless (every token reaches its k experts), so balance is
    read from the spread of the counts rather than from dropped tokens."""

    def __init__(self, model: nn.Module):
        self.counts: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}  # the latest summary ``take`` gave
        self._handles = []
        modules = dict(base_modules(model))
        for key in dict.fromkeys(m for m, _ in expert_parameters(model)):
            module = modules[key]
            # hook the outermost module at that name: an adapter layer wrapping the experts gets the
            # same call, and its grouped path computes the experts without calling the inner module
            outer = model.get_submodule(key)
            self._handles.append(outer.register_forward_pre_hook(self._counter(key, module.num_experts),
                                                                 with_kwargs=True))

    @classmethod
    def attach(cls, model: nn.Module) -> Optional["RouterLoad"]:
        """A counter on ``model``'s experts, or None when it has none."""
        load = cls(model)
        return load if load._handles else None

    def _counter(self, key: str, experts: int):
        def count(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if module.training:
                return
            chosen = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            if not isinstance(chosen, torch.Tensor):
                return
            ids = chosen.detach().reshape(-1).long()
            ids = ids[(ids >= 0) & (ids < experts)]  # some models mark padding slots with an id past the last
            tally = torch.bincount(ids, minlength=experts)
            self.counts[key] = tally if key not in self.counts else self.counts[key] + tally
        return count

    def take(self) -> dict[str, float]:
        """Summary of the counts since the last call (empty when nothing was counted): the worst
        layer's busiest expert over the mean load (1 = even), the mean coefficient of variation of the
        per-expert counts, and the share of (layer, expert) pairs that got no token."""
        counts, self.counts = self.counts, {}
        if not counts:
            return {}
        loads = [c.float().cpu() for c in counts.values()]
        ratios = [(c.max() / c.mean()).item() for c in loads if c.sum() > 0]
        cvs = [(c.std(unbiased=False) / c.mean()).item() for c in loads if c.sum() > 0]
        idle = sum(int((c == 0).sum()) for c in loads) / sum(c.numel() for c in loads)
        self.last = {"router_max_over_mean_load": max(ratios, default=0.0),
                     "router_load_cv": sum(cvs) / len(cvs) if cvs else 0.0,
                     "router_idle_expert_share": idle,
                     "router_tokens": int(sum(c.sum().item() for c in loads))}
        return dict(self.last)

    @staticmethod
    def describe(stats: dict[str, float]) -> str:
        """One log line for ``take``'s summary."""
        return (f"router load: busiest expert {stats['router_max_over_mean_load']:.2f}x the mean (worst layer), "
                f"coefficient of variation {stats['router_load_cv']:.2f}, idle experts "
                f"{stats['router_idle_expert_share']:.0%} over {stats['router_tokens']:,d} token-expert slots")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
