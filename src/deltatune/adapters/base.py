"""The protocol every adapter layer follows, per-row routing plans, and trainable copies.

An ``AdapterLayer`` wraps one base module as ``base_layer`` and holds any number of named
adapters in ``nn.ModuleDict``/``nn.ParameterDict`` attributes keyed by adapter name (PEFT's
layout, so state-dict keys map to PEFT's by a rename). The model-level functions in
``deltatune.adapter_ops`` only talk to layers through the methods defined here.
"""

from __future__ import annotations

import copy
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

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
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
                    result = result.index_copy(0, rows, routed.to(out_dtype))
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

    def merge(self, names: Sequence[str], untie: bool = False, requantize: bool = False) -> None:
        """Fold the named adapters into the base weight, in order, exactly as forward applies them.

        ``untie``: the base weight is shared with another module; merge into a private copy.
        ``requantize``: for a quantized base, store the merged weight quantized again (lossy)
        rather than in full precision.
        """
        names = [n for n in names if n in self.adapter_names and n not in self.merged_adapters]
        if not names:
            return
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
        with torch.no_grad():
            current = weight.detach().float()
            for name in names:
                current = self.merge_into(name, current, original)
                if bias is not None:
                    bias.data.copy_(self.merge_bias_into(name, bias.detach().float()).to(bias.dtype))
            weight.data.copy_(current.to(weight.dtype))
        self.merged_adapters.extend(names)

    def _merge_quantized(self, names: Sequence[str], requantize: bool) -> None:
        """Dequantize, merge in float32, then keep the result in full precision or re-quantize."""
        if self._original_quant is None:
            self._original_quant = (self.base_layer,)
        original = self._original_quant[0]
        reference = original.dequantize(torch.float32)
        current = self.base_layer
        weight = current.dequantize(torch.float32) if isinstance(current, QuantLinear) else current.weight.float()
        bias = None if current.bias is None else current.bias.detach().float()
        with torch.no_grad():
            for name in names:
                weight = self.merge_into(name, weight, reference)
                if bias is not None:
                    bias = self.merge_bias_into(name, bias)
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
        if self._original_quant is not None:
            original = self._original_quant[0]
            current = self.base_layer
            device = current.device if isinstance(current, QuantLinear) else current.weight.device
            self.base_layer = original.to(device)  # follows the model if it moved while merged
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
