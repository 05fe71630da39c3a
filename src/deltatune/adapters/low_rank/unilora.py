"""Uni-LoRA layers: LoRA factors whose every entry is read from one vector shared by the model.

Per adapter, one trained vector ``theta_d`` lives on the model (``ThetaVectors``, file key
``base_model.unilora_theta_d``). Each layer holds fixed integer indices ``unilora_indices_A``
(r, in) and ``unilora_indices_B`` (out, r) into it and fixed scales of the same shapes; then
``A = theta_d[indices_A] · scales_A``, ``B`` likewise, and the update is ``B @ A``.

The indices are PEFT's: all targeted layers' entries (in module order, each layer's ``A`` then
its ``B``, row-major) are numbered, and ``assign_indices`` spreads the ``theta_d_length`` slots
over them evenly, shuffled by ``proj_seed`` with NumPy's generator exactly as PEFT draws them.
A slot used ``c`` times scales its entries by ``1/√c``. So a file without indices
(``save_indices=False``, the default) rebuilds the same adapter; files with them carry the
indices (int64) and scales (the base weight's dtype) per layer.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from ...config.low_rank import UniLoraConfig
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import FILE_PREFIX, LayerMethod, register_method
from ..shared import TrainedOncePerAdapter, UnsavedBuffers

THETA_ATTR = "deltatune_unilora_theta"
THETA_KEY = "base_model.unilora_theta_d"
INDEX_KINDS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


class ThetaVectors(TrainedOncePerAdapter):
    """Each Uni-LoRA adapter's shared vector: the one trained tensor all its layers read."""

    attribute = "unilora_theta_d"

    def __init__(self) -> None:
        super().__init__(nn.ParameterDict())


def assign_indices(count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` slot numbers in [0, length): each slot ⌊count/length⌋ times, ``count % length``
    distinct slots once more, then shuffled; NumPy's ``default_rng(seed)`` draws as PEFT's do."""
    rng = np.random.default_rng(seed)
    slots = np.repeat(np.arange(length), count // length)
    extra = count % length
    if extra:
        slots = np.concatenate([slots, rng.choice(length, size=extra, replace=False)])
    rng.shuffle(slots)
    return torch.as_tensor(slots, dtype=torch.long)


class UniLoraLinear(LinearAdapterLayer):
    adapter_dict_names = INDEX_KINDS

    def __init__(self, base_layer: nn.Module, thetas: ThetaVectors, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        for kind in INDEX_KINDS:
            setattr(self, kind, UnsavedBuffers())
        self.unilora_dropout = nn.ModuleDict()
        self._thetas = (thetas,)  # a reference, not a submodule: the vectors are registered once on the model

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return iter(())  # the layer trains nothing of its own; ThetaVectors holds the vector

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for kind in INDEX_KINDS:
            if name in getattr(self, kind):
                del getattr(self, kind)[name]
        if name in self.unilora_dropout:
            del self.unilora_dropout[name]

    def add(self, name: str, config: UniLoraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        weight = self.base_weight()
        device = weight.device if not weight.is_meta else torch.device("cpu")
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        # placeholders of the right shapes; UniLoraMethod fills them once every layer is known
        shapes = {"A": (config.r, in_features), "B": (out_features, config.r)}
        for part, shape in shapes.items():
            getattr(self, f"unilora_indices_{part}")[name] = torch.zeros(shape, dtype=torch.long, device=device)
            getattr(self, f"unilora_scales_{part}")[name] = torch.zeros(shape, dtype=dtype, device=device)
        p = config.unilora_dropout
        self.unilora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling[name] = 1.0

    def file_tensors(self, name: str, with_indices: bool = False) -> dict[str, torch.Tensor]:
        if not with_indices:
            return {}
        return {kind: getattr(self, kind)[name] for kind in INDEX_KINDS}

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): A (r, in), B (out, r), in the shared vector's dtype."""
        theta = self._thetas[0].unilora_theta_d[name]
        A = theta[self.unilora_indices_A[name]] * self.unilora_scales_A[name].to(theta.dtype)
        B = theta[self.unilora_indices_B[name]] * self.unilora_scales_B[name].to(theta.dtype)
        return A, B

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = self.factors(name)
        x = self.unilora_dropout[name](x.to(A.dtype))
        return result + nn.functional.linear(nn.functional.linear(x, A), B).to(result.dtype)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        A, B = self.factors(name)
        delta = (B.detach().float() @ A.detach().float()).to(weight.device)
        return self.canonical(self.canonical(weight) + delta)


def unilora_layers(model: nn.Module, name: str) -> list[tuple[str, UniLoraLinear]]:
    """(key, layer) of every layer holding adapter ``name``, in module order (PEFT's numbering order)."""
    return [(key, m) for key, m in model.named_modules() if isinstance(m, UniLoraLinear) and m.has_adapter(name)]


class UniLoraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(UniLoraLinear, self._make, bias_only="unilora_only")
        self._thetas: Optional[ThetaVectors] = None

    def _make(self, module: nn.Module, config: UniLoraConfig, key: str) -> UniLoraLinear:
        check_linear_like(module, "Uni-LoRA")
        return UniLoraLinear(module, self._thetas, config.fan_in_fan_out)

    def inject(self, model: nn.Module, config: UniLoraConfig, name: str, from_file: bool) -> None:
        thetas = getattr(model, THETA_ATTR, None)
        if thetas is None:
            thetas = ThetaVectors()
            setattr(model, THETA_ATTR, thetas)
        if config.init_weights:
            theta = torch.empty(config.theta_d_length).uniform_(-config.init_theta_d_bound, config.init_theta_d_bound)
        else:
            theta = torch.randn(config.theta_d_length)
        self._thetas = thetas
        try:
            super().inject(model, config, name, from_file)
        finally:
            self._thetas = None
        layers = unilora_layers(model, name)
        reference = layers[0][1].base_weight() if layers else next(model.parameters())
        device = reference.device if not reference.is_meta else torch.device("cpu")
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        thetas.unilora_theta_d[name] = nn.Parameter(theta.to(device, dtype))
        self._assign(layers, name, config)

    @staticmethod
    def _assign(layers: list[tuple[str, UniLoraLinear]], name: str, config: UniLoraConfig) -> None:
        """Number every factor entry of the adapter and give each its slot and scale, as PEFT does."""
        parts = [getattr(layer, f"unilora_indices_{p}")[name] for _, layer in layers for p in "AB"]
        total = sum(t.numel() for t in parts)
        if total == 0:
            return
        slots = assign_indices(total, config.theta_d_length, config.proj_seed)
        uses = torch.bincount(slots, minlength=config.theta_d_length).float()
        inv_sqrt = torch.where(uses > 0, uses.clamp(min=1).rsqrt(), torch.zeros_like(uses))
        start = 0
        for _, layer in layers:
            for p in "AB":
                indices = getattr(layer, f"unilora_indices_{p}")[name]
                chunk = slots[start:start + indices.numel()].view(indices.shape)
                start += indices.numel()
                scales = getattr(layer, f"unilora_scales_{p}")[name]
                indices.copy_(chunk.to(indices.device))
                scales.copy_(inv_sqrt[chunk].to(scales.device, scales.dtype))

    def remove(self, model: nn.Module, name: str) -> None:
        thetas = getattr(model, THETA_ATTR, None)
        if thetas is None:
            return
        thetas.delete_adapter(name)
        if not thetas.adapter_names:
            delattr(model, THETA_ATTR)

    def file_tensors(self, model: nn.Module, name: str, config: UniLoraConfig) -> dict[str, torch.Tensor]:
        out = super().file_tensors(model, name, config)  # modules_to_save copies
        if config.save_indices:
            for key, layer in unilora_layers(model, name):
                for sub, tensor in layer.file_tensors(name, with_indices=True).items():
                    out[f"{FILE_PREFIX}{key}.{sub}"] = tensor
        out[THETA_KEY] = getattr(model, THETA_ATTR).unilora_theta_d[name]
        return out

    def optional_file_keys(self, config: UniLoraConfig) -> set[str]:
        return set()  # with save_indices the file must carry them (PEFT writes them all)

    def prepare_load(self, model: nn.Module, name: str, config: UniLoraConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """Indices in a file must point into ``theta_d`` (a gather past its end would fail later, unclearly)."""
        for key, value in tensors.items():
            if ".unilora_indices_" in key and value.numel() and \
                    (value.min() < 0 or value.max() >= config.theta_d_length):
                raise ValueError(f"{key}: indices outside theta_d of length {config.theta_d_length}")


register_method("UNILORA", UniLoraMethod())
