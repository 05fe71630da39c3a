"""X-LoRA: several frozen LoRA adapters ("experts") mixed per token by a small learned classifier.

Each forward pass of the model runs twice, as in PEFT:

1. a scaling pass, without gradients: every expert's input is scaled by ``scaling_pass_value``;
   the classifier reads the last hidden states and gives every token a scaling per expert
   (per LoRA layer with ``layerwise_scalings``; softmax, top-k as the config says);
2. the real pass: in LoRA layer ``l`` expert ``e`` adds ``scale_e · g · B_e A_e (s[l, e] · x)``
   (``g``: ``global_scaling_weight``), gradients reaching the classifier through ``s``.

The experts are ordinary LoRA adapters held by deltatune's LoRA layers under the internal names
``<adapter>:<expert>`` (a name users cannot choose), never active on their own. Each LoRA layer
holding an expert gets an ``ExpertMixture`` as the LoRA variant (``low_rank/lora_options/lora_variant.py``) of the X-LoRA
adapter's name, so the layer's forward, per-row routing and merge refusal go through it. The
classifiers live in one ``XLoraGates`` container on the model, whose forward pre-hook (PyTorch's
public hook API) runs the scaling pass.

Files, PEFT's layout: ``adapter_config.json`` (``XLoraConfig``), ``adapter_model.safetensors``
with the classifier under ``base_model.internal_xlora_classifier.layers.<i>.*``, and each expert as
a PEFT LoRA folder in the sub-folder named after it. Loading prefers those sub-folders over the
paths in ``adapters`` (PEFT documents the same; ``experts.py`` reads them). PEFT 0.21.2 itself
drops from what it saves the tensors whose key contains ``.<expert name>.`` (``layers.0`` of the
classifier, ``layers.1`` of expert "0", with experts "0", "1"): deltatune writes every tensor,
refuses such an incomplete classifier rather than guess its values, and reads an incomplete expert
from the path in ``adapters`` instead (with a warning), as PEFT reads experts from given paths.
Experts must be plain LoRA (no DoRA, LoRA variants, trained biases or ``modules_to_save``).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ... import kernels
from ...config import AdapterConfig, LoraConfig, XLoraConfig
from ..base import AdapterContainer, RowPlan
from ..low_rank.lora import LoraEmbedding, LoraLayer
from ..low_rank.lora_options.lora_variant import LoraVariant
from ..method import Method, method_for, register_method
from .experts import drop_expert, load_expert

GATES_ATTR = "deltatune_xlora"
CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier."


def expert_key(name: str, expert: str) -> str:
    """The LoRA layers' name for expert ``expert`` of X-LoRA adapter ``name`` (':' is never in a user's name)."""
    return f"{name}:{expert}"


class XLoraClassifier(nn.Module):
    """PEFT's classifier layout: ``layers`` = [Linear, ReLU, (Dropout)] × (depth - 1) + Linear."""

    def __init__(self, config: XLoraConfig, experts: int, layers: int):
        super().__init__()
        out = experts * layers if config.layerwise_scalings else experts
        parts: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            parts += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:  # PEFT adds the module only then: the indices in files follow
                parts.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        self.layers = nn.Sequential(*parts, nn.Linear(width, out))
        self.experts, self.temperature = experts, config.softmax_temperature
        self.softmax = config.enable_softmax

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, seq, layers or 1, experts) scalings for hidden states (batch, seq, hidden)."""
        logits = self.layers(hidden)
        scalings = logits.reshape(*logits.shape[:2], -1, self.experts)
        return torch.softmax(scalings / self.temperature, dim=-1) if self.softmax else scalings


class XLoraMix:
    """One X-LoRA adapter's state between its two passes (plain Python, shared by its layers)."""

    def __init__(self, name: str, config: XLoraConfig, experts: list[str], expert_configs: dict[str, LoraConfig]):
        self.name, self.config, self.experts = name, config, experts
        self.expert_configs = expert_configs
        self.layers = 0
        # (batch, seq, layers or 1, experts): the latest scalings, kept after the forward so that
        # activation checkpointing can recompute the layers in the backward pass
        self.scalings: Optional[torch.Tensor] = None
        self.passing = False  # the scaling pass is running

    def layer_scalings(self, index: int, plan: Optional[RowPlan]) -> torch.Tensor:
        """Layer ``index``'s (rows, seq, experts) scalings, top-k and its softmax applied (PEFT's order)."""
        if self.scalings is None:
            raise RuntimeError(f"X-LoRA adapter {self.name!r} has no scalings: call the model itself "
                               "(its forward hook computes them), not one of its submodules")
        scalings = self.scalings[:, :, index if self.scalings.shape[2] > 1 else 0]
        if plan is not None:  # routed per row: this layer sees only the rows of this adapter
            rows = dict(plan.groups(scalings.shape[0], scalings.device))[self.name]
            scalings = scalings.index_select(0, rows)
        k = self.config.top_k_lora
        if k is not None:
            keep = torch.zeros_like(scalings, dtype=torch.bool)
            keep.scatter_(-1, torch.topk(scalings, k=k, dim=-1).indices, True)
            scalings = scalings * keep.to(scalings.dtype)
        if self.config.enable_softmax_topk:  # renormalise the kept (non-zero) scalings
            nonzero = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return scalings


class ExpertMixture(LoraVariant):
    """The X-LoRA adapter's update on one LoRA layer (the layer's ``index``-th among its layers)."""

    def __init__(self, mix: XLoraMix, index: int):
        self.mix, self.index = mix, index

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        mix = self.mix
        keys = [(i, expert_key(name, e)) for i, e in enumerate(mix.experts)]
        keys = [(i, k) for i, k in keys if k in layer.scaling]
        if mix.passing and mix.config.scaling_pass_value == 0:
            # the experts' inputs are zero: only a LoRA bias would add anything (exactly as PEFT computes it)
            keys = [(i, k) for i, k in keys if k in layer.lora_B and layer.lora_B[k].bias is not None]
            if not keys:
                return result
        scalings = mix.layer_scalings(self.index, layer.row_plan)
        weight = mix.config.global_scaling_weight
        for i, key in keys:
            s = scalings[..., i:i + 1]
            A, B, scale = layer.live_factors(key)
            if isinstance(layer, LoraEmbedding):
                delta = (kernels.embed(x, A.T, layer.base_layer) * s) @ B.T * (scale * weight)
                embed_scale = kernels.embed_scale_of(layer.base_layer)
                if embed_scale is not None:
                    delta = delta * (embed_scale.to(delta.dtype) if isinstance(embed_scale, torch.Tensor) else embed_scale)
                result = result + delta
            else:  # PEFT scales the expert's input, so a LoRA bias is not scaled by s
                result = kernels.lora_add(x.to(A.dtype) * s, result, A, B, layer.lora_B[key].bias,
                                          scale * weight, layer.dropout_p(key))
        return result

    def merge_problem(self, layer: nn.Module, name: str) -> Optional[str]:
        return "X-LoRA's scalings depend on each input, so no fixed weight holds it"


class XLoraGates(AdapterContainer):
    """The classifiers of a model's X-LoRA adapters and the hook that runs the scaling pass."""

    def __init__(self) -> None:
        super().__init__()
        self.classifiers = nn.ModuleDict()
        self.mixes: dict[str, XLoraMix] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_plan: Optional[RowPlan] = None
        self._handle = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.classifiers.keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self.classifiers:
            yield from self.classifiers[name].parameters()

    def delete_adapter(self, name: str) -> None:
        if name in self.classifiers:
            del self.classifiers[name]
        self.mixes.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def attach(self, model: nn.Module) -> None:
        self._handle = model.register_forward_pre_hook(self._scaling_pass, with_kwargs=True)

    def needs_full_passes(self) -> bool:
        """A live X-LoRA adapter reads the whole sequence at every call: generation must run
        without a key/value cache (``evaluate.generation`` asks this)."""
        return self._live() is not None

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _live(self) -> Optional[str]:
        if self.disabled:
            return None
        wanted = self.row_plan.names if self.row_plan is not None else self.active_adapters
        names = sorted({n for n in wanted if n in self.mixes})
        if len(names) > 1:
            raise NotImplementedError(f"one X-LoRA adapter at a time can be active or routed; got {names}")
        return names[0] if names else None

    def _scaling_pass(self, model: nn.Module, args: tuple, kwargs: dict):
        name = self._live()
        if name is None:
            return None
        mix, classifier = self.mixes[name], self.classifiers[name]
        for key in ("past_key_values", "cache"):
            cache = kwargs.get(key)
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise RuntimeError("X-LoRA computes its scalings from the whole sequence at every call, so it "
                                   "cannot continue from a key/value cache: generate with use_cache=False (as PEFT)")
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        dtype = next(classifier.parameters()).dtype
        mix.scalings = torch.full((inputs.shape[0], inputs.shape[1], 1, len(mix.experts)),
                                  float(mix.config.scaling_pass_value), dtype=dtype, device=inputs.device)
        pass_kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "past_key_values", "cache")}
        pass_kwargs.update(use_cache=False, output_hidden_states=True, return_dict=True)
        if "logits_to_keep" in _forward_parameters(model) and "logits_to_keep" not in kwargs:
            pass_kwargs["logits_to_keep"] = 1  # only the hidden states are read: skip most of the head
        mix.passing = True
        try:
            with torch.no_grad():
                hidden = model.forward(*args, **pass_kwargs).hidden_states[-1]  # forward, not __call__: no hooks
        finally:
            mix.passing = False
        mix.scalings = classifier(hidden.to(dtype))
        return None


@functools.lru_cache(maxsize=None)
def _forward_parameters_of(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _forward_parameters(model: nn.Module) -> frozenset[str]:
    """The keywords ``model.forward`` takes (read once per class: it inspects a signature)."""
    return _forward_parameters_of(type(model))


class XLoraMethod(Method):
    """X-LoRA at the model level: experts in LoRA layers, classifiers in ``XLoraGates``."""

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        assert isinstance(config, XLoraConfig)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise NotImplementedError("XLoraConfig: deltatune's X-LoRA supports decoder-only models")
        config.task_type = config.task_type or "CAUSAL_LM"  # PEFT's X-LoRA only runs under PeftModelForCausalLM
        hidden = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
        if config.hidden_size is None:
            config.hidden_size = hidden
        elif config.hidden_size != hidden:
            raise ValueError(f"XLoraConfig.hidden_size={config.hidden_size} but the model's hidden size is {hidden}")

    def locate_companions(self, config: AdapterConfig, folder: Path) -> None:
        assert isinstance(config, XLoraConfig)
        config.expert_folders = {e: str(folder / e) for e in config.adapters
                                 if (folder / e / "adapter_config.json").is_file()}

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, XLoraConfig)
        gates = getattr(model, GATES_ATTR, None)
        if gates is None:
            gates = XLoraGates()
            setattr(model, GATES_ATTR, gates)
            gates.attach(model)
        experts = list(config.adapters)
        found = config.expert_folders or {}
        expert_configs: dict[str, LoraConfig] = {}
        for expert in experts:
            folders = [Path(found[expert])] if expert in found else []
            expert_configs[expert] = load_expert(model, expert_key(name, expert), expert,
                                                 folders + [Path(config.adapters[expert])])
        mix = XLoraMix(name, config, experts, expert_configs)
        keys = [expert_key(name, e) for e in experts]
        for _, layer in model.named_modules():  # PEFT numbers the LoRA layers in module order
            if isinstance(layer, LoraLayer) and any(k in layer.scaling for k in keys):
                layer.variants[name] = ExpertMixture(mix, mix.layers)
                mix.layers += 1
        weight = model.get_input_embeddings().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        gates.classifiers[name] = XLoraClassifier(config, len(experts), mix.layers).to(weight.device, dtype)
        gates.mixes[name] = mix
        gates.train(model.training)

    def remove(self, model: nn.Module, name: str) -> None:
        gates = getattr(model, GATES_ATTR, None)
        prefix = expert_key(name, "")
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.variants.pop(name, None)
        for internal in {n for _, layer in model.named_modules() if isinstance(layer, LoraLayer)
                         for n in layer.adapter_names if n.startswith(prefix)}:
            drop_expert(model, internal)
        if gates is not None:
            gates.delete_adapter(name)
            if not gates.adapter_names:
                gates.detach()
                delattr(model, GATES_ATTR)

    def extra_parameters(self, model: nn.Module, name: str, config: AdapterConfig) -> Iterator[nn.Parameter]:
        assert isinstance(config, XLoraConfig)
        if config.use_trainable_adapters:
            yield from (t for k, t in self._expert_tensors(model, name).items() if ".lora_" in k)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        classifier = getattr(model, GATES_ATTR).classifiers[name]
        return {CLASSIFIER_PREFIX + k: v for k, v in classifier.state_dict(keep_vars=True).items()}

    def prepare_load(self, model: nn.Module, name: str, config: AdapterConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.file_tensors(model, name, config)) - set(tensors))
        if missing:
            raise ValueError(
                f"the X-LoRA classifier tensor(s) {missing} are missing from the file. PEFT 0.21.2 leaves out "
                "those whose key contains '.<expert name>.' (e.g. layers.0 with experts named \"0\", \"1\"), so "
                "its saved classifier is incomplete; deltatune does not guess them. Save the classifier's full "
                "state under these keys, or save the adapter with deltatune")

    def companion_files(self, model: nn.Module, name: str,
                        config: AdapterConfig) -> dict[str, tuple[AdapterConfig, dict[str, torch.Tensor]]]:
        mix = getattr(model, GATES_ATTR).mixes[name]
        out = {}
        for expert in mix.experts:
            tensors = self._expert_tensors(model, name, expert)
            out[expert] = (mix.expert_configs[expert],
                           {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})
        return out

    def _expert_tensors(self, model: nn.Module, name: str, only: Optional[str] = None) -> dict[str, torch.Tensor]:
        """File key -> live tensor of the experts of ``name`` (of expert ``only``, if given)."""
        mix = getattr(model, GATES_ATTR).mixes[name]
        out: dict[str, torch.Tensor] = {}
        for expert in mix.experts if only is None else [only]:
            lora_config = mix.expert_configs[expert]
            tensors = method_for(lora_config).file_tensors(model, expert_key(name, expert), lora_config)
            out.update(tensors)  # with the base embedding weights a LoRA file holds when it targets one
        return out

register_method("XLORA", XLoraMethod())
