"""Selective tuning: train chosen tensors of the base model itself (BitFit, named tensors, top-k layers).

Each module that owns a chosen tensor is wrapped in a ``SelectiveLayer``, which keeps one
trainable copy of the chosen tensors per adapter and runs the module with the copies
swapped in (``torch.func.functional_call``). The base tensors never change, so disabling,
switching and unmerging give the base back exactly; merging writes the copies into the
base. File format (deltatune's own, same two-file layout as PEFT): ``adapter_config.json``
with ``"peft_type": "SELECTIVE"`` and the fields of ``SelectiveConfig``;
``adapter_model.safetensors`` with each trained tensor under its own name,
``base_model.model.<module>.<weight|bias>``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from ...config import SelectiveConfig
from ...quant.layers import QuantLinear
from ...module_tree import replace_module
from ..base import AdapterContainer, AdapterLayer, base_parameters
from ..method import FILE_PREFIX, Method, register_method


class TensorCopies(nn.Module):
    """The trained copies of one adapter on one module, under the module's own tensor names."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t.detach().clone()))


class SelectiveLayer(AdapterLayer):
    adapter_dict_names = ("copies",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.copies = nn.ModuleDict()

    def add(self, name: str, tensor_names: list[str], dtype: torch.dtype | None = None) -> None:
        if name in self.copies:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        tensors = {t: getattr(self.base_layer, t) for t in tensor_names}
        copies = TensorCopies(tensors)
        if dtype is not None:  # train in float32 even when the base is half precision
            copies.to(dtype)
        self.copies[name] = copies

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.copies[name].named_parameters())

    def _swapped(self, names) -> dict[str, torch.Tensor]:
        swapped: dict[str, torch.Tensor] = {}
        for name in names:  # later active adapters win where two train the same tensor
            if name in self.copies and name not in self.merged_adapters:
                swapped.update(dict(self.copies[name].named_parameters()))
        return swapped

    def _run(self, swapped: dict[str, torch.Tensor], args, kwargs):
        if not swapped:
            return self.base_layer(*args, **kwargs)
        base = {k: v for k, v in self.base_layer.named_parameters(recurse=False)}
        params = {k: swapped[k].to(base[k].dtype) if k in swapped else v for k, v in base.items()}
        return functional_call(self.base_layer, params, args, kwargs)

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        if self.row_plan is None:
            return self._run(self._swapped(self.active_adapters), args, kwargs)
        x = args[0]
        result = self.base_layer(*args, **kwargs)
        for name, rows in self.row_plan.groups(x.shape[0], x.device):
            if name in self.copies:
                routed = self._run(self._swapped([name]), (x.index_select(0, rows), *args[1:]), kwargs)
                result = result.index_copy(0, rows, routed.to(result.dtype))
        return result

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        copies = self.copies[name]
        return copies.weight.detach().float().to(weight.device) if hasattr(copies, "weight") else weight

    def merge_bias_into(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        copies = self.copies[name]
        return copies.bias.detach().float().to(bias.device) if hasattr(copies, "bias") else bias


def _public_names(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Base tensor name as the user sees it (a selective wrapper's ``base_layer`` left out)
    -> (owning module's key, tensor name)."""
    out = {}
    for k, _ in base_parameters(model):
        module, _, tensor = k.rpartition(".")
        owner, _, last = module.rpartition(".")
        if last == "base_layer" and isinstance(model.get_submodule(owner), SelectiveLayer):
            module = owner  # already wrapped by another selective adapter: name the wrapper
        out[f"{module}.{tensor}" if module else tensor] = (module, tensor)
    return out


def _layer_index(name: str, patterns: list[str]) -> Optional[int]:
    """The block number in a dotted tensor name (``model.layers.3.mlp.weight`` -> 3), if any."""
    found = re.search(rf"(?:^|\.)(?:{'|'.join(patterns)})\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def chosen_tensors(model: nn.Module, config: SelectiveConfig) -> dict[str, list[str]]:
    """Module name -> names of its tensors that ``config`` trains."""
    public = _public_names(model)
    names = list(public)
    chosen: set[str] = set()
    if config.bitfit:
        chosen |= {k for k in names if k.endswith(".bias") or k == "bias"}
    if isinstance(config.parameters, str):
        chosen |= {k for k in names if re.fullmatch(config.parameters, k)}
    elif config.parameters:
        chosen |= {k for k in names if any(k == p or k.endswith("." + p) for p in config.parameters)}
    if config.top_k_layers:
        patterns = config.layers_pattern or ["layers", "h", "layer", "block", "blocks"]
        patterns = [patterns] if isinstance(patterns, str) else patterns
        index = {k: i for k in names if (i := _layer_index(k, patterns)) is not None}
        if not index:
            raise ValueError(f"SelectiveConfig.top_k_layers: no parameter name matches the layer patterns {patterns}")
        top = sorted(set(index.values()))[-config.top_k_layers:]
        chosen |= {k for k, i in index.items() if i in top}
        # A quantized linear keeps its weight as packed buffers, not parameters: without this
        # check the top layers would silently train their norms only.
        packed = [k for k, m in model.named_modules() if isinstance(m, QuantLinear) and _layer_index(k + ".", patterns) in top]
        if packed:
            raise TypeError(f"SelectiveConfig.top_k_layers: the top layers' linear weights are quantized ({packed[0]!r} "
                            "and others), so they cannot be trained; load the base without quantization, or train "
                            "an adapter such as LoRA on the quantized base")
    by_module: dict[str, list[str]] = defaultdict(list)
    for k in sorted(chosen):
        module, tensor = public[k]
        by_module[module].append(tensor)
    return dict(by_module)


class SelectiveMethod(Method):
    def inject(self, model: nn.Module, config: SelectiveConfig, name: str, from_file: bool) -> None:
        chosen = chosen_tensors(model, config)
        if not chosen:
            what = "bias" if config.bitfit and not config.parameters and not config.top_k_layers else "chosen"
            raise ValueError(f"SelectiveConfig: {type(model).__name__} has no {what} tensors to train"
                             + (" (this architecture has no biases; try parameters=[...] or top_k_layers)"
                                if what == "bias" else ""))
        for key, tensors in chosen.items():
            module = model.get_submodule(key) if key else model
            if not isinstance(module, SelectiveLayer):
                if isinstance(module, QuantLinear) or ".base_layer" in f".{key}" or isinstance(module, AdapterContainer):
                    raise TypeError(f"module {key!r}: selective tuning cannot train tensors of a quantized layer "
                                    "or of another adapter")
                odd = [t for t in tensors if t not in ("weight", "bias")]
                if odd:
                    raise TypeError(f"module {key!r}: selective tuning trains 'weight' and 'bias' tensors; got {odd}")
                layer = SelectiveLayer(module)
                replace_module(model, key, layer)
                layer.train(module.training)
                module = layer
            module.add(name, tensors)

    def file_tensors(self, model: nn.Module, name: str, config: SelectiveConfig) -> dict[str, torch.Tensor]:
        out = {}
        for key, layer in model.named_modules():
            if isinstance(layer, SelectiveLayer) and name in layer.copies:
                for sub, tensor in layer.file_tensors(name).items():
                    out[f"{FILE_PREFIX}{key}.{sub}"] = tensor
        return out


register_method("SELECTIVE", SelectiveMethod())
