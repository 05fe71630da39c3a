"""Configs of methods that mix several adapters with a learned gate: X-LoRA, Poly (and MHR).

PEFT's field names, defaults and ``peft_type``, so an ``adapter_config.json`` reads the same in
both tools.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (Any: config_from_dict resolves inherited hints here)

from .base import AdapterConfig, TargetedConfig, check_positive_int, check_probability, register_config

_EXPERT_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@register_config
@dataclass
class XLoraConfig(AdapterConfig):
    """X-LoRA (Buehler & Buehler, 2024): a frozen base, several LoRA adapters ("experts") and a small
    classifier that mixes them per token.

    A first pass runs the model with every expert scaled by ``scaling_pass_value``; the classifier
    reads its last hidden states and gives each token a scaling per expert (per LoRA layer with
    ``layerwise_scalings``, else one set shared by all layers); the second pass applies the experts
    with those scalings. ``adapters`` maps expert names to LoRA adapter folders (PEFT expects the
    names "0", "1", ...); ``hidden_size`` None takes the model's. ``xlora_depth`` linear layers
    (``xlora_size`` wide, ReLU and ``xlora_dropout_p`` dropout between them) make the classifier;
    ``softmax_temperature`` divides its logits before the softmax (``enable_softmax``);
    ``top_k_lora`` keeps the k largest scalings per token, ``enable_softmax_topk`` renormalises
    those; ``global_scaling_weight`` multiplies every expert's output. ``use_trainable_adapters``
    trains the experts beside the classifier. Not mergeable: the scalings depend on the input.
    """

    peft_type: ClassVar[str] = "XLORA"
    mergeable: ClassVar[bool] = False
    # Where dt.load_adapter found the experts (sub-folders of the loaded folder, which win over the
    # paths in ``adapters``, as in PEFT); set per instance, never written to files.
    expert_folders: ClassVar[Optional[dict[str, str]]] = None
    hidden_size: Optional[int] = None
    adapters: Optional[dict[str, str]] = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: Optional[int] = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def validate(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.adapters, dict) or not self.adapters:
            raise ValueError(
                f"{owner}.adapters must name the LoRA adapters to mix (name -> adapter folder), e.g. "
                "adapters={'0': 'out/a/adapter', '1': 'out/b/adapter'} (deltatune train: "
                "--adapter '{adapters: {\"0\": out/a/adapter, \"1\": out/b/adapter}}')"
            )
        for name, path in self.adapters.items():
            if not isinstance(name, str) or not _EXPERT_NAME.fullmatch(name):
                raise ValueError(f"{owner}.adapters: name {name!r} must be letters, digits, '_' or '-'")
            if not isinstance(path, str) or not path:
                raise ValueError(f"{owner}.adapters[{name!r}] must be an adapter folder, got {path!r}")
        if self.hidden_size is not None:
            check_positive_int(owner, "hidden_size", self.hidden_size)
        check_positive_int(owner, "xlora_depth", self.xlora_depth)
        check_positive_int(owner, "xlora_size", self.xlora_size)
        check_probability(owner, "xlora_dropout_p", self.xlora_dropout_p)
        if not isinstance(self.softmax_temperature, (int, float)) or not self.softmax_temperature > 0:
            raise ValueError(f"{owner}.softmax_temperature must be above 0, got {self.softmax_temperature!r}")
        if self.top_k_lora is not None:
            check_positive_int(owner, "top_k_lora", self.top_k_lora)
            if self.top_k_lora > len(self.adapters):
                raise ValueError(f"{owner}.top_k_lora={self.top_k_lora} exceeds the number of adapters "
                                 f"({len(self.adapters)})")
        # PEFT warns about these (both are still well defined), and so does deltatune.
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn(f"{owner}: enable_softmax_topk without top_k_lora renormalises over every adapter")
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn(f"{owner}: enable_softmax and enable_softmax_topk are both on (two softmaxes)")



@register_config
@dataclass
class PolyConfig(TargetedConfig):
    """Polytropon (Ponti et al., 2022) and Multi-Head Routing (Caccia et al., 2023): each targeted
    linear layer holds ``n_skills`` LoRA "skills" of rank ``r``; every task learns which skills to
    mix, and each row of a batch uses its own task's mixture (``task_ids``).

    ``n_tasks`` tasks share the skills; ``n_splits`` > 1 splits the input and output features into
    that many heads, each mixed separately (Multi-Head Routing). The mixture is the sigmoid of a
    learned logit per (task, head, skill), normalised over skills; training draws it from a relaxed
    Bernoulli instead. The update is ``x A_mix B_mix / r``. ``init_weights``: True zeroes ``B``
    (no change at first), False draws it as ``A`` is drawn. ``poly_type``: only ``"poly"``.
    Not mergeable: rows of different tasks need different weights.
    """

    peft_type: ClassVar[str] = "POLY"
    mergeable: ClassVar[bool] = False
    r: int = 8
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def validate(self) -> None:
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            check_positive_int("PolyConfig", name, getattr(self, name))
        if self.poly_type != "poly":
            raise ValueError(f"PolyConfig.poly_type must be 'poly' (the only router PEFT 0.21 has), "
                             f"got {self.poly_type!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"PolyConfig.init_weights must be true or false, got {self.init_weights!r}")
