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
  Taken for transformers' experts modules whenever it pays (``moe_grouped.pays``), and always for
  4-bit expert weights (``quant.experts``): it decodes them inside its matmul, in both passes, and
  keeps no decoded copy for backward.
- full weight: the wrapped module runs with ``W + scale · B A`` in place of each adapted
  parameter. Kept where the grouped path does not apply or does not pay: tiny expert weights
  (forming them is cheaper than the grouped update and the copy is under 4 MiB), 2-D parameters
  (a router's weight), parameters other than the fused gate_up/up/down weights, experts modules
  that are not transformers' decorated classes, expert parallelism and a custom experts kernel.
  Merged adapters are in the weight already and cost neither path.
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
import weakref
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call

from ...config import LoraConfig
from ...quant.experts import packed_bytes, quantized_parameter
from ...targeting import pattern_value
from ...targeting_experts import parameter_shape
from ..base import AdapterLayer
from . import moe_grouped, moe_merge


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
            found = quantized_parameter(self.base_layer, p)
            weight = packed_bytes(self.base_layer, p) if found is not None else self.param(p)
            dtype = found.compute_dtype if found is not None else \
                weight.dtype if weight.dtype.is_floating_point else torch.float32
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
        module = self.base_layer
        four_bit = any(quantized_parameter(module, p) is not None for p in self.parameter_names)
        if self.compute == "full":
            if four_bit:
                raise ValueError("ExpertLoraLayer.compute='full': the expert weights are stored in 4 bits, which "
                                 "only the grouped path computes (it decodes them without keeping a copy)")
            return None, "compute='full'"
        reason = moe_grouped.unsupported_reason(module)
        known = {"gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj"}
        if reason is None and not set(self.parameter_names) <= known:
            reason = f"adapted parameters {self.parameter_names} are not only {sorted(known)}"
        routing = moe_grouped.parse_call(args, kwargs) if reason is None else None
        if reason is None and routing is None:
            reason = "the call is not (hidden_states, top_k_index, top_k_weights)"
        if reason is None and self.compute == "auto" and not four_bit:
            weight = self.param(self.parameter_names[0])
            if not moe_grouped.pays(weight, routing.index.numel()):
                reason = f"tiny expert weights {tuple(weight.shape)}: forming W + ΔW costs less for this many tokens"
        if reason is not None:
            if self.compute == "grouped" or four_bit:
                why = "the grouped path, which 4-bit expert weights need," if four_bit else "compute='grouped'"
                raise ValueError(f"ExpertLoraLayer on {type(module).__name__}: {why} cannot run: {reason}")
            return None, reason
        return routing, "4-bit expert weights" if four_bit else f"compute={self.compute!r}"

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

    # ----- merging (moe_merge.py) ---------------------------------------------------------------
    def merge(self, names: Sequence[str], untie: bool = False, requantize: bool = False) -> None:
        """Fold the named adapters into every adapted parameter (float32, then its dtype; a 4-bit
        parameter stays in full precision, or with ``requantize`` in 4 bits again); the first merge
        keeps CPU copies of the originals so that ``unmerge`` restores them bit for bit."""
        moe_merge.merge(self, names, requantize)

    def unmerge(self) -> None:
        moe_merge.unmerge(self)

    def set_merge_aside(self) -> None:
        moe_merge.set_aside(self)

    def restore_merge(self) -> None:
        moe_merge.put_back(self)


def _shape_of(module: nn.Module, parameter: str) -> tuple[int, int, int, bool]:
    """(experts, in, out, transposed) of ``module.<parameter>``; experts 0 for a 2-D weight (out, in).
    A 3-D weight is (E, out, in) unless the module says ``is_transposed`` (transformers' flag for
    experts stored (E, in, out), as gpt-oss's)."""
    shape = parameter_shape(module, parameter)
    if len(shape) == 2:
        return 0, shape[1], shape[0], False
    if len(shape) != 3:
        raise TypeError(f"target_parameters: {type(module).__name__}.{parameter} has {len(shape)} "
                        "dimensions; LoRA adapts 2-D weights and 3-D expert weights")
    transposed = bool(getattr(module, "is_transposed", False))
    experts, d1, d2 = shape
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
