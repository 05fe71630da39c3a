"""LoRA on parameters (PEFT's ``target_parameters``): the fused 3-D expert weights of
mixture-of-experts models in transformers 5, and any 2-D weight named directly.

One ``ExpertLoraLayer`` wraps a module (an experts module) and adapts the named parameters of it.
Per adapter and parameter it holds PEFT's factors: ``lora_A`` of shape (r·E, in) and ``lora_B`` of
shape (out, r·E) for E experts, read per expert as ``A.view(E, r, in)`` and
``B.view(out, r, E).permute(2, 0, 1)`` (PEFT's layout: A's rows go expert-major, B's columns
rank-major). The update of expert e is ``scale · B_e A_e`` in (out, in) layout, stored transposed
where the module says ``is_transposed`` (gpt-oss); ``scale = alpha / r`` (``alpha / √r`` for rsLoRA).

The forward pass has two paths, chosen per call (``ExpertLoraLayer.compute``, logged once per
experts class and reason; the last choice is in ``last_path``):

- grouped (``moe_grouped.py``): the token-expert pairs sorted by expert, the base matmul and the
  low-rank update ``s · (x A_eᵀ) B_eᵀ`` computed per expert group with grouped matrix
  multiplications, the module's own gate/activation/biases around them; no copy of the weights.
  Taken for transformers' experts modules whenever it pays (``moe_grouped.pays``).
- full weight: the wrapped module runs with ``W + scale · B A`` in place of each adapted
  parameter. Kept where the grouped path does not apply or does not pay: tiny expert weights
  (forming them is cheaper than the grouped update and the copy is under 4 MiB), 2-D parameters
  (a router's weight), parameters other than the fused gate_up/up/down weights, experts modules
  that are not transformers' decorated classes, expert parallelism and a custom experts kernel
  (non-float, quantized expert weights are refused when the adapter is added). Merged adapters are in the weight already and cost neither path.
  One batched matmul (``baddbmm``) per adapter and parameter forms the whole 3-D weight,
  never a Python loop over experts. The weights go in through ``torch.func.functional_call``, PyTorch's
public way to run a module with given tensors in place of its parameters for one call: unlike
``nn.utils.parametrize`` it does not swap the module's class on every registration nor change the
base model's state-dict keys, and unlike a forward pre-hook it needs no assignment to a registered
parameter; the transformers module itself is left as it is.

PEFT nests one wrapper per parameter (the first in the module's parameter order innermost), so its
file keys read ``...experts.base_layer.lora_A.weight`` for the inner and ``...experts.lora_A.weight``
for the outer parameter; ``file_tensors`` writes exactly those keys from the one layer here.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call

from ...config import LoraConfig
from ...module_tree import replace_module
from ...targeting import DEFAULT_TARGETS, find_targets, pattern_value
from ...targeting_experts import expert_parameters, matched_parameters
from ..base import AdapterLayer, ModulesToSave, _SetAsideMerge, adapter_layers
from . import moe_grouped


class ExpertLoraLayer(AdapterLayer):
    """LoRA on parameters ``parameter_names`` of ``base_layer`` (PEFT's order: innermost first)."""

    adapter_dict_names = ("lora_A", "lora_B")
    compute = "auto"  # "auto", "grouped" or "full": see the module docstring
    grouped_backend = "auto"  # "auto" (grouped_mm where usable, else padded bmm), "grouped_mm", "padded"
    last_path: Optional[tuple[str, str]] = None  # (path, reason) of the last adapted call

    def __init__(self, base_layer: nn.Module, parameter_names: Sequence[str]):
        super().__init__(base_layer)
        self.parameter_names = list(parameter_names)
        # adapter -> parameter -> nn.Linear, so that PEFT's key of each reads "lora_A.weight"
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, dict[str, int]] = {}
        self.lora_alpha: dict[str, dict[str, float]] = {}
        self.scaling: dict[str, dict[str, float]] = {}
        self.shapes: dict[str, tuple[int, int, int, bool]] = {}  # parameter -> (experts, in, out, transposed)
        for p in self.parameter_names:
            self.shapes[p] = _shape_of(base_layer, p)
        self._rows_in_batch: Optional[int] = None  # the batch the parent module saw (per-row routing)
        self._probe = None

    # ----- bookkeeping -------------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return name in self.lora_A

    def _forget(self, name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        if not self.lora_A and self._probe is not None:
            self._probe.remove()
            self._probe = None

    def param(self, parameter: str) -> torch.Tensor:
        return getattr(self.base_layer, parameter)

    def base_weight(self) -> torch.Tensor:
        """The first adapted parameter (merging goes through ``merge`` below, for all of them)."""
        return self.param(self.parameter_names[0])

    @property
    def weight(self) -> torch.Tensor:
        return self.base_weight()

    def watch_batch(self, parent: nn.Module) -> None:
        """Record the batch size of ``parent``'s (B, S, H) input on every call: the experts see the
        tokens flattened to (B·S, H), and per-row routing must know which row each token is in."""
        ref = weakref.ref(self)

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            layer = ref()
            if layer is None:
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            layer._rows_in_batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 \
                else None

        self._probe = parent.register_forward_pre_hook(record, with_kwargs=True)

    # ----- adding ------------------------------------------------------------------------
    def add(self, name: str, config: LoraConfig, key: str, from_file: bool = False) -> None:
        """Create adapter ``name`` on every adapted parameter; ``key`` is the module's name (the
        rank/alpha patterns see ``key.<parameter>``, as PEFT's)."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.r[name], self.lora_alpha[name], self.scaling[name] = {}, {}, {}
        A, B = nn.ModuleDict(), nn.ModuleDict()
        for p in self.parameter_names:
            experts, in_f, out_f, _ = self.shapes[p]
            full = f"{key}.{p}"
            r = pattern_value(config.rank_pattern, full, config.r)
            alpha = pattern_value(config.alpha_pattern, full, config.lora_alpha)
            self.r[name][p], self.lora_alpha[name][p] = r, alpha
            self.scaling[name][p] = alpha / (math.sqrt(r) if config.use_rslora else r)
            A[p] = nn.Linear(in_f, r * max(experts, 1), bias=False)  # a 2-D weight is one "expert"
            B[p] = nn.Linear(r * max(experts, 1), out_f, bias=False)
            if not from_file:
                _initialise(A[p], B[p], r, config.init_lora_weights)
            weight = self.param(p)
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
            if not weight.is_meta:
                A[p].to(weight.device, dtype)
                B[p].to(weight.device, dtype)
        self.lora_A[name], self.lora_B[name] = A, B

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Sub-key -> live tensor of adapter ``name``, as PEFT's nested wrappers name them."""
        out = {}
        depth = len(self.parameter_names)
        for i, p in enumerate(self.parameter_names):
            prefix = "base_layer." * (depth - 1 - i)
            out[f"{prefix}lora_A.weight"] = self.lora_A[name][p].weight
            out[f"{prefix}lora_B.weight"] = self.lora_B[name][p].weight
        return out

    # ----- the update --------------------------------------------------------------------
    def factors(self, name: str, parameter: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(lhs, rhs, scale) with ``scale · lhs @ rhs`` the update in the stored layout: (E, ·, ·)
        batched over experts for a 3-D parameter, a plain matrix for a 2-D one."""
        experts, in_f, out_f, transposed = self.shapes[parameter]
        A = self.lora_A[name][parameter].weight.to(dtype)
        B = self.lora_B[name][parameter].weight.to(dtype)
        scale = self.scaling[name][parameter]
        if experts == 0:  # a 2-D parameter, (out, in)
            return B, A, scale
        per_A = A.view(experts, -1, in_f)  # (E, r, in): rows expert-major
        per_B = B.view(out_f, -1, experts).permute(2, 0, 1)  # (E, out, r): columns rank-major
        if transposed:  # stored (E, in, out)
            return per_A.transpose(1, 2), per_B.transpose(1, 2), scale
        return per_B, per_A, scale

    def delta_weight(self, name: str, parameter: str) -> torch.Tensor:
        """``scale · B A`` of one parameter in its stored layout, float32."""
        lhs, rhs, scale = self.factors(name, parameter, torch.float32)
        return (torch.bmm(lhs, rhs) if lhs.dim() == 3 else lhs @ rhs) * scale

    def adapted_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Parameter -> ``W + Σ scale · B A`` over adapters ``names``, in W's dtype (autocast off:
        the module must see the parameter's own dtype, as it would without an adapter)."""
        out = {}
        for p in self.parameter_names:
            weight = self.param(p)
            with torch.autocast(device_type=weight.device.type, enabled=False):
                for name in names:
                    lhs, rhs, scale = self.factors(name, p, weight.dtype)
                    fold = torch.baddbmm if lhs.dim() == 3 else torch.addmm
                    weight = fold(weight, lhs, rhs, alpha=scale)
            out[p] = weight
        return out

    def _live(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]

    def forward(self, *args, **kwargs):
        if self.row_plan is not None and not self.disabled:
            return self._per_row(args, kwargs)
        return self._run(self._live(), args, kwargs)

    def _run(self, names: Sequence[str], args: tuple, kwargs: dict):
        if not names:
            return self.base_layer(*args, **kwargs)
        routing, reason = self._grouped_plan(args, kwargs)
        path = "grouped" if routing is not None else "full-weight"
        self.last_path = (path, reason)
        moe_grouped.note_choice(self.base_layer, path, reason)
        if routing is not None:
            return moe_grouped.grouped_experts_forward(self.base_layer, routing, self.expert_updates(names),
                                                          self.grouped_backend)
        return functional_call(self.base_layer, self.adapted_weights(names), args, kwargs)

    def _grouped_plan(self, args: tuple, kwargs: dict) -> tuple[Optional[moe_grouped.Routing], str]:
        """(routing, reason) for the grouped path, or (None, why the full-weight path is kept)."""
        if self.compute not in ("auto", "grouped", "full"):
            raise ValueError(f"ExpertLoraLayer.compute={self.compute!r}: use 'auto', 'grouped' or 'full'")
        if self.compute == "full":
            return None, "compute='full'"
        module = self.base_layer
        reason = moe_grouped.unsupported_reason(module)
        known = {"gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj"}
        if reason is None and not set(self.parameter_names) <= known:
            reason = f"adapted parameters {self.parameter_names} are not only {sorted(known)}"
        routing = moe_grouped.parse_call(args, kwargs) if reason is None else None
        if reason is None and routing is None:
            reason = "the call is not (hidden_states, top_k_index, top_k_weights)"
        if reason is None and self.compute == "auto":
            weight = self.param(self.parameter_names[0])
            if not moe_grouped.pays(weight, routing.index.numel()):
                reason = f"tiny expert weights {tuple(weight.shape)}: forming W + ΔW costs less for this many tokens"
        if reason is not None:
            if self.compute == "grouped":
                raise ValueError(f"ExpertLoraLayer.compute='grouped' on {type(module).__name__}: {reason}")
            return None, reason
        return routing, f"compute={self.compute!r}"

    def expert_updates(self, names: Sequence[str]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """Parameter -> [(A (E, r, in), B (E, out, r), scale)] per adapter in ``names``: each expert's
        factors in the (out, in) reading of the weight, whatever its stored layout."""
        out: dict[str, list] = {}
        for p in self.parameter_names:
            experts, in_f, out_f, _ = self.shapes[p]
            for name in names:
                A = self.lora_A[name][p].weight.view(experts, -1, in_f)  # rows expert-major
                B = self.lora_B[name][p].weight.view(out_f, -1, experts).permute(2, 0, 1)  # columns rank-major
                out.setdefault(p, []).append((A, B, self.scaling[name][p]))
        return out

    def _per_row(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """Each row's tokens through the experts with its own adapter's weights: one call per
        adapter in the batch (rows without an adapter, or whose adapter is not here, use the base)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        tokens, batch = hidden.shape[0], self._rows_in_batch
        if batch is None or tokens % batch:
            raise RuntimeError(f"per-row routing through {type(self.base_layer).__name__}: the module that "
                               "calls it did not get a (batch, sequence, hidden) input, so the rows of its "
                               f"{tokens} tokens are unknown")
        per_row = tokens // batch
        steps = torch.arange(per_row, device=hidden.device)
        groups = [(n, (rows.unsqueeze(1) * per_row + steps).reshape(-1))
                  for n, rows in self.row_plan.groups(batch, hidden.device) if n in self.lora_A]
        routed = torch.zeros(tokens, dtype=torch.bool, device=hidden.device)
        for _, idx in groups:
            routed[idx] = True
        base_idx = (~routed).nonzero().squeeze(1)
        result = None
        for names, idx in [((), base_idx)] + [((n,), idx) for n, idx in groups]:
            if idx.numel() == 0:
                continue
            out = self._run(names, *_rows_of((args, kwargs), idx, tokens))
            if result is None:
                result = out.new_zeros((tokens, *out.shape[1:]))
            result = result.index_copy(0, idx, out.to(result.dtype))
        return result

    # ----- merging -----------------------------------------------------------------------
    def merge(self, names: Sequence[str], untie: bool = False, requantize: bool = False) -> None:
        """Fold the named adapters into every adapted parameter (float32, then its dtype); the first
        merge keeps CPU copies of the originals so that ``unmerge`` restores them bit for bit."""
        if self._set_aside is not None:
            raise RuntimeError("cannot merge inside dt.disable_adapters (the merged adapters are set aside "
                               "until the block ends); merge after the block")
        names = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        if self._original_weight is None:
            self._original_weight = {p: self.param(p).detach().to("cpu", copy=True) for p in self.parameter_names}
        with torch.no_grad():
            for p in self.parameter_names:
                weight = self.param(p)
                current = weight.detach().float()
                for name in names:
                    current = current + self.delta_weight(name, p).to(weight.device)
                weight.data.copy_(current.to(weight.dtype))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        self._set_aside = None
        if self._original_weight is None:
            return
        with torch.no_grad():
            for p, original in self._original_weight.items():
                self.param(p).data.copy_(original.to(self.param(p).device))
        self._original_weight = None
        self.merged_adapters = []

    def set_merge_aside(self) -> None:
        if not self.merged_adapters or self._set_aside is not None:
            return
        aside = _SetAsideMerge(list(self.merged_adapters), False)
        aside.weight = {p: self.param(p).detach().to("cpu", copy=True) for p in self.parameter_names}
        aside.original_weight = self._original_weight
        self.unmerge()
        self._set_aside = aside

    def restore_merge(self) -> None:
        aside, self._set_aside = self._set_aside, None
        if aside is None:
            return
        with torch.no_grad():
            for p, merged in aside.weight.items():
                self.param(p).data.copy_(merged.to(self.param(p).device))
        self._original_weight = aside.original_weight
        self.merged_adapters = list(aside.adapters)


def _shape_of(module: nn.Module, parameter: str) -> tuple[int, int, int, bool]:
    """(experts, in, out, transposed) of ``module.<parameter>``; experts 0 for a 2-D weight (out, in).
    A 3-D weight is (E, out, in) unless the module says ``is_transposed`` (transformers' flag for
    experts stored (E, in, out), as gpt-oss's)."""
    weight = getattr(module, parameter)
    if weight.dim() == 2:
        return 0, weight.shape[1], weight.shape[0], False
    if weight.dim() != 3:
        raise TypeError(f"target_parameters: {type(module).__name__}.{parameter} has {weight.dim()} "
                        "dimensions; LoRA adapts 2-D weights and 3-D expert weights")
    transposed = bool(getattr(module, "is_transposed", False))
    experts, d1, d2 = weight.shape
    return (experts, d1, d2, True) if transposed else (experts, d2, d1, False)


def _initialise(A: nn.Linear, B: nn.Linear, r: int, init: Union[bool, str]) -> None:
    """PEFT's LoRA starts: True: A Kaiming-uniform, B zero; 'gaussian': A normal(1/r), B zero;
    False: both as nn.Linear starts them (the adapter changes outputs from the start)."""
    if init is False:
        return
    if init == "gaussian":
        nn.init.normal_(A.weight, std=1 / r)
    else:
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
    nn.init.zeros_(B.weight)


def _rows_of(call: tuple[tuple, dict], idx: torch.Tensor, tokens: int) -> tuple[tuple, dict]:
    """The call's per-token tensors (first dimension ``tokens``) cut to positions ``idx``."""
    def take(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == tokens:
            return value.index_select(0, idx)
        return value

    args, kwargs = call
    return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}


def expert_layers(model: nn.Module) -> list[tuple[str, ExpertLoraLayer]]:
    """(name, layer) of every ``ExpertLoraLayer`` in ``model``."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, ExpertLoraLayer)]


def inject_parameters(model: nn.Module, config: LoraConfig, name: str, from_file: bool) -> list[str]:
    """Add adapter ``name`` to every parameter ``config.target_parameters`` reaches; returns their
    full names (empty when none matched). Refused as PEFT refuses: a parameter of a module that
    another adapter layer wraps, and adapters that target different sets of parameters."""
    found = matched_parameters(model, list(config.target_parameters or []))
    if not found:
        return []
    by_module: dict[str, list[str]] = {}
    for module_key, parameter in found:
        if not module_key:
            raise ValueError(f"target_parameters: {parameter!r} sits on the top-level model, which cannot be "
                             "wrapped (PEFT refuses it too)")
        by_module.setdefault(module_key, []).append(parameter)
    existing = {k: layer.parameter_names for k, layer in expert_layers(model) if layer.adapter_names}
    if existing and existing != by_module:
        raise ValueError("When using multiple adapters with `target_parameters`, all adapters must target the same "
                         f"set of parameters (as in PEFT); adapter {name!r} targets "
                         f"{sorted(f'{k}.{p}' for k, ps in by_module.items() for p in ps)[:4]}..., the existing "
                         f"ones {sorted(f'{k}.{p}' for k, ps in existing.items() for p in ps)[:4]}...")
    for module_key, parameters in by_module.items():
        module = model.get_submodule(module_key)
        if isinstance(module, (AdapterLayer, ModulesToSave)) and not isinstance(module, ExpertLoraLayer):
            raise ValueError(f"target_parameters: the parameters of {module_key!r} ({parameters}) cannot be "
                             f"adapted, as {type(module).__name__} already wraps it; make sure the module is "
                             "not also targeted with target_modules (PEFT refuses this too)")
        for parameter in parameters:
            tensor = getattr(module, parameter, None) if "." not in parameter else None
            if tensor is not None and not tensor.is_floating_point():
                raise ValueError(f"target_parameters: {module_key}.{parameter} is {tensor.dtype} (quantized); LoRA on "
                                 "expert parameters needs them in floating point")
        layer = module
        if not isinstance(module, ExpertLoraLayer):
            layer = ExpertLoraLayer(module, parameters)
            replace_module(model, module_key, layer)
            parent_key = module_key.rpartition(".")[0]
            layer.watch_batch(model.get_submodule(parent_key) if parent_key else model)
        layer.add(name, config, module_key, from_file=from_file)
        layer.train(module.training)
    return [f"{k}.{p}" for k, p in found]


def parameters_only(model: nn.Module, config: LoraConfig) -> bool:
    """``config`` adapts parameters alone: ``target_parameters`` set and ``target_modules`` None on
    an architecture without default modules (PEFT then leaves ``target_modules`` None; where it has
    defaults, as for Mixtral, it fills them in and adapts those modules too)."""
    if not config.target_parameters or config.target_modules is not None:
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type not in (config.default_targets or DEFAULT_TARGETS)


def targets_modules(model: nn.Module, config: LoraConfig) -> bool:
    """Beside its parameters, ``config`` reaches modules (or trains copies of some)."""
    if parameters_only(model, config):
        return bool(config.modules_to_save)
    return bool(find_targets(model, config)) or bool(config.modules_to_save)


def inject_lora_parameters(model: nn.Module, config: LoraConfig, name: str, from_file: bool) -> None:
    """The ``target_parameters`` part of a LoRA adapter, after its modules (PEFT's order): an error
    when neither matched anything, a warning (as PEFT's) when only the parameters matched nothing."""
    if not config.target_parameters:
        return
    if inject_parameters(model, config, name, from_file):
        return
    if not any(layer.has_adapter(name) for _, layer in adapter_layers(model)):
        known = [f"{m}.{p}" for m, p in expert_parameters(model)][:6]
        raise ValueError(f"target_parameters={config.target_parameters!r} matched no parameter of "
                         f"{type(model).__name__}" + (f"; its expert weights include {known}" if known else ""))
    warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                  RuntimeWarning, stacklevel=3)


def expert_file_tensors(model: nn.Module, name: str, prefix: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor of adapter ``name``'s parameter factors, PEFT's keys."""
    out = {}
    for key, layer in expert_layers(model):
        if layer.has_adapter(name):
            for sub, tensor in layer.file_tensors(name).items():
                out[f"{prefix}{key}.{sub}"] = tensor
    return out
