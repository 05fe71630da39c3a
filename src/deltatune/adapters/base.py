"""The protocol every adapter layer follows, per-row routing plans, and trainable copies.

An ``AdapterLayer`` wraps one base module as ``base_layer`` and holds any number of named
adapters in ``nn.ModuleDict``/``nn.ParameterDict`` attributes keyed by adapter name (PEFT's
layout, so state-dict keys map to PEFT's by a rename). The model-level functions in
``deltatune.adapter_ops`` only talk to layers through the methods defined here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..module_tree import AddedModule
from ..quant.layers import QuantLinear


class RowPlan:
    """Which adapter each row of a batch uses; ``None`` means the base model alone."""

    def __init__(self, names: Sequence[Optional[str]]):
        if len(names) == 0:
            raise ValueError("adapter_per_row needs one adapter name (or None) per row; got an empty list")
        self.names = list(names)
        self._cache: dict[tuple[torch.device, int], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, batch: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(adapter name, row indices) for a batch of ``batch`` rows.

        A batch that is a whole multiple of the plan (beam search, several samples per
        prompt) repeats each row's choice, as ``generate`` repeats each prompt.
        """
        key = (device, batch)
        if key not in self._cache:
            n = len(self.names)
            if batch % n != 0:
                raise ValueError(f"adapter_per_row was given {n} names but the batch has {batch} rows")
            repeat = batch // n
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                if name is not None:
                    rows.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
            self._cache[key] = [
                (name, torch.tensor(idx, dtype=torch.long, device=device)) for name, idx in rows.items()
            ]
        return self._cache[key]


@dataclass
class _SetAsideMerge:
    """A layer's merged state while ``dt.disable_adapters`` has the layer unmerged.

    Kept to be put back as it was, not merged again: re-merging would not give the same bytes
    back (several merge steps round in between; re-quantizing rounds again).
    """

    adapters: list[str]
    requantized: bool
    # Quantized base: the merged layer and the original it replaced (held, not copied).
    merged_layer: Optional[nn.Module] = None
    original_quant: Optional[tuple[QuantLinear]] = None
    # Full-precision base: CPU copies of the merged tensors (unmerge overwrites them in place),
    # the unmerged copies, and the private weight of a tied base.
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    original_weight: Optional[torch.Tensor] = None
    original_bias: Optional[torch.Tensor] = None
    private_weight: Optional[nn.Parameter] = None


def _device_of(module: nn.Module) -> torch.device:
    return module.device if isinstance(module, QuantLinear) else module.weight.device


class AdapterLayer(AddedModule):
    """Base for layers that wrap ``base_layer`` and hold named adapters.

    Subclasses list the attributes that hold per-adapter tensors in ``adapter_dict_names``
    and implement ``add``, ``apply`` (the output with one adapter applied) and
    ``merge_into`` (the base weight with one adapter folded in).
    """

    adapter_dict_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.row_plan: Optional[RowPlan] = None
        # Exact copies of the base tensors taken at the first merge, kept on the CPU so that
        # unmerge restores them bit for bit without holding accelerator memory.
        self._original_weight: Optional[torch.Tensor] = None
        self._original_bias: Optional[torch.Tensor] = None
        # A base weight shared with another module (tied embeddings) is replaced by a private
        # copy while merged, so merging never changes the other module; unmerge re-ties it.
        self._tied_weight: Optional[nn.Parameter] = None
        # A quantized base is swapped for a merged layer; the original is kept (it is small) so
        # that unmerge puts back exactly the stored bytes. Held in a tuple so that it is not a
        # registered submodule (it must not appear in state dicts or module walks).
        self._original_quant: Optional[tuple[QuantLinear]] = None
        self.merge_requantized = False
        self._set_aside: Optional[_SetAsideMerge] = None

    # ----- bookkeeping -------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_dict_names:
            for key in getattr(self, attr).keys():
                if key not in names:
                    names.append(key)
        return names

    def has_adapter(self, name: str) -> bool:
        """Cheap membership test for the forward pass (``adapter_names`` builds a list)."""
        return any(name in getattr(self, attr) for attr in self.adapter_dict_names)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_dict_names:
            holder = getattr(self, attr)
            if name not in holder:
                continue
            item = holder[name]
            if isinstance(item, nn.Parameter):
                yield item
            else:
                yield from item.parameters()

    def holds_merged(self, name: str) -> bool:
        """Adapter ``name`` is merged into the base weight, or set aside by ``dt.disable_adapters``."""
        return name in self.merged_adapters or (self._set_aside is not None and name in self._set_aside.adapters)

    def delete_adapter(self, name: str) -> None:
        if self.holds_merged(name):
            raise RuntimeError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        for attr in self.adapter_dict_names:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        self._forget(name)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _forget(self, name: str) -> None:
        """Drop per-adapter plain-Python state (ranks, scalings); subclasses extend."""

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code reads ``module.weight`` (T5 checks its dtype)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def quantized(self) -> bool:
        """The base layer stores its weight quantized (``deltatune.quant``)."""
        return isinstance(self.base_layer, QuantLinear)

    def base_weight(self) -> torch.Tensor:
        """The base weight in its stored layout; for a quantized base, a dequantized copy."""
        if self.quantized:
            return self.base_layer.dequantize()
        return self.base_layer.weight

    # ----- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        out_dtype = result.dtype
        if self.row_plan is not None:
            for name, rows in self.row_plan.groups(x.shape[0], x.device):
                if self.has_adapter(name) and name not in self.merged_adapters:
                    routed = self.apply(name, x.index_select(0, rows), result.index_select(0, rows))
                    if torch.is_grad_enabled():
                        result = result.index_copy(0, rows, routed.to(out_dtype))
                    else:  # inference: this forward's own tensor, filled in place instead of copied per adapter
                        result.index_copy_(0, rows, routed.to(out_dtype))
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            result = self.apply(name, x, result)
        return result.to(out_dtype)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the output so far for input ``x``) with adapter ``name`` applied."""
        raise NotImplementedError

    # ----- merging -------------------------------------------------------------------------
    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """``weight`` (float32, stored layout) with adapter ``name`` folded in.

        ``original`` is the unmerged base weight, which some methods (DoRA) need.
        """
        raise NotImplementedError

    def merge_bias_into(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def merge_step(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   original_weight: torch.Tensor, original_bias: Optional[torch.Tensor],
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight, bias)`` (float32, stored layout) with adapter ``name`` folded in.

        ``original_*`` are the unmerged base tensors; methods whose bias update depends on the
        weight (DoRA) override this, the others implement ``merge_into``/``merge_bias_into``.
        """
        weight = self.merge_into(name, weight, original_weight)
        return weight, None if bias is None else self.merge_bias_into(name, bias)

    def merge_problem(self, name: str) -> Optional[str]:
        """Why adapter ``name`` cannot be merged into this layer, or ``None`` when it can."""
        return None

    def merge(self, names: Sequence[str], untie: bool = False, requantize: bool = False) -> None:
        """Fold the named adapters into the base weight, in order, exactly as forward applies them.

        ``untie``: the base weight is shared with another module; merge into a private copy.
        ``requantize``: for a quantized base, store the merged weight quantized again (lossy)
        rather than in full precision.
        """
        if self._set_aside is not None:
            raise RuntimeError("cannot merge inside dt.disable_adapters (the merged adapters are set aside "
                               "until the block ends); merge after the block")
        names = [n for n in names if n in self.adapter_names and n not in self.merged_adapters]
        if not names:
            return
        for name in names:
            problem = self.merge_problem(name)
            if problem:
                raise ValueError(f"adapter {name!r} cannot be merged: {problem}")
        if self.quantized or self._original_quant is not None:
            self._merge_quantized(names, requantize)
            return
        if untie and self._tied_weight is None:
            self._tied_weight = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(self._tied_weight.detach().clone(), requires_grad=False)
        weight = self.base_weight()
        bias = getattr(self.base_layer, "bias", None)
        if self._original_weight is None:
            self._original_weight = weight.detach().to("cpu", copy=True)
            self._original_bias = None if bias is None else bias.detach().to("cpu", copy=True)
        original = self._original_weight.to(weight.device, torch.float32)
        original_bias = None if self._original_bias is None else self._original_bias.to(weight.device, torch.float32)
        with torch.no_grad():
            current = weight.detach().float()
            current_bias = None if bias is None else bias.detach().float()
            for name in names:
                current, current_bias = self.merge_step(name, current, current_bias, original, original_bias)
            weight.data.copy_(current.to(weight.dtype))
            if bias is not None:
                bias.data.copy_(current_bias.to(bias.dtype))
        self.merged_adapters.extend(names)

    def _merge_quantized(self, names: Sequence[str], requantize: bool) -> None:
        """Dequantize, merge in float32, then keep the result in full precision or re-quantize."""
        if self._original_quant is None:
            self._original_quant = (self.base_layer,)
        original = self._original_quant[0]
        reference = original.dequantize(torch.float32)
        reference_bias = None if original.bias is None else original.bias.detach().float()
        current = self.base_layer
        weight = current.dequantize(torch.float32) if isinstance(current, QuantLinear) else current.weight.float()
        bias = None if current.bias is None else current.bias.detach().float()
        with torch.no_grad():
            for name in names:
                weight, bias = self.merge_step(name, weight, bias, reference, reference_bias)
        if requantize:
            self.base_layer = original.requantized(weight, bias)
        else:
            self.base_layer = original.to_linear(original.compute_dtype)
            with torch.no_grad():
                self.base_layer.weight.copy_(weight)
                if bias is not None:
                    self.base_layer.bias.copy_(bias)
        self.merge_requantized = requantize
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the base weight (and bias) exactly as they were before the first merge."""
        self._set_aside = None  # inside dt.disable_adapters the layer is unmerged already: it stays so
        if self._original_quant is not None:
            original = self._original_quant[0]
            self.base_layer = original.to(_device_of(self.base_layer))  # follows the model if it moved while merged
            self._original_quant = None
            self.merge_requantized = False
            self.merged_adapters = []
            return
        if self._original_weight is None:
            return
        weight = self.base_weight()
        with torch.no_grad():
            weight.data.copy_(self._original_weight.to(weight.device))
            if self._original_bias is not None:
                self.base_layer.bias.data.copy_(self._original_bias.to(weight.device))
        if self._tied_weight is not None:
            self.base_layer.weight = self._tied_weight
            self._tied_weight = None
        self._original_weight = None
        self._original_bias = None
        self.merged_adapters = []

    @property
    def untied_for_merge(self) -> bool:
        return self._tied_weight is not None

    # ----- setting a merge aside (dt.disable_adapters) -------------------------------------
    def set_merge_aside(self) -> None:
        """Unmerge for a while; ``restore_merge`` puts the merged state back exactly as it was.

        A quantized base keeps its merged layer aside (no copy); a full-precision base copies
        its merged weight and bias to the CPU, as the unmerged originals are kept.
        """
        if not self.merged_adapters or self._set_aside is not None:
            return
        aside = _SetAsideMerge(list(self.merged_adapters), self.merge_requantized)
        if self._original_quant is not None:
            aside.merged_layer, aside.original_quant = self.base_layer, self._original_quant
        else:
            bias = getattr(self.base_layer, "bias", None)
            aside.weight = self.base_layer.weight.detach().to("cpu", copy=True)
            aside.bias = None if bias is None else bias.detach().to("cpu", copy=True)
            aside.original_weight, aside.original_bias = self._original_weight, self._original_bias
            if self._tied_weight is not None:
                aside.private_weight = self.base_layer.weight
        self.unmerge()
        self._set_aside = aside

    def restore_merge(self) -> None:
        """Undo ``set_merge_aside``: the same tensors, layers and flags as before it."""
        aside, self._set_aside = self._set_aside, None
        if aside is None:  # nothing set aside, or unmerged meanwhile (which stands)
            return
        device = _device_of(self.base_layer)  # follow the model if it moved meanwhile
        if aside.merged_layer is not None:
            self.base_layer = aside.merged_layer.to(device)
            self._original_quant = aside.original_quant
        else:
            if aside.private_weight is not None:
                self._tied_weight = self.base_layer.weight
                aside.private_weight.data = aside.private_weight.data.to(device)
                self.base_layer.weight = aside.private_weight
            with torch.no_grad():
                self.base_layer.weight.data.copy_(aside.weight)
                if aside.bias is not None:
                    self.base_layer.bias.data.copy_(aside.bias)
            self._original_weight, self._original_bias = aside.original_weight, aside.original_bias
        self.merged_adapters = list(aside.adapters)
        self.merge_requantized = aside.requantized

    @property
    def merge_set_aside(self) -> bool:
        """``dt.disable_adapters`` has this layer's merge set aside for its block."""
        return self._set_aside is not None


class AdapterContainer(AddedModule):
    """Adapter holders that are not layer wrappers (trainable copies, soft prompts).

    They share the bookkeeping of ``AdapterLayer``: ``adapter_names``, ``adapter_parameters``,
    ``delete_adapter``, ``active_adapters``, ``disabled`` and ``row_plan``.
    """


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every adapter layer and adapter container in the model."""
    for key, module in model.named_modules():
        if isinstance(module, (AdapterLayer, AdapterContainer)):
            yield key, module


def base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of the base model, not of any adapter or trainable copy."""
    adapter_ids = {id(p) for _, layer in adapter_layers(model) for n in layer.adapter_names
                   for p in layer.adapter_parameters(n)}
    for key, p in model.named_parameters():
        if id(p) not in adapter_ids:
            yield key, p


class ModulesToSave(AdapterContainer):
    """A module trained in full: one trainable copy per adapter beside the frozen original."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_plan: Optional[RowPlan] = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].parameters()

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def current(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.row_plan is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        for name, rows in self.row_plan.groups(x.shape[0], x.device):
            if name in self.modules_to_save:
                routed = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                result = result.index_copy(0, rows, routed.to(result.dtype))
        return result
