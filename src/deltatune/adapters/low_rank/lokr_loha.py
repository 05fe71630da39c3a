"""LoHa and LoKr layers (PEFT's LyCORIS family) around linear-like base layers.

LoHa: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/r`` (a Hadamard product of two rank-r
products). LoKr: ``ΔW = kron(w1, w2) · alpha/r``, where ``w1`` is (a, c) and ``w2`` is (b, d)
with ``out = a·b`` and ``in = c·d`` from ``factorization``; a factor whose sides are large
against r is itself stored as a rank-r product (``w*_a @ w*_b``). Tensors keep PEFT's names
(``hada_w1_a``..., ``lokr_w1``, ``lokr_w2_a``...), so files are a rename of state-dict keys.

Both support PEFT's ``module_dropout`` (skip the whole adapter for a step with that
probability) and ``rank_dropout`` (drop output rows of ΔW).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config import LoHaConfig, LoKrConfig
from ...targeting import pattern_value
from ..linear_base import WeightDeltaLayer, check_linear_like
from ..method import LayerMethod, register_method


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m <= n, m·n = dimension: the divisor pair nearest the square
    root, or with m = ``factor`` when that divides. Same rule as PEFT/LyCORIS, so shapes agree."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class _LycorisLayer(WeightDeltaLayer):
    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for table in (self.r, self.alpha, self.rank_dropout, self.module_dropout):
            table.pop(name, None)

    def add(self, name: str, config, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.alpha)
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.module_dropout[name] = config.module_dropout
        self._create(name, r, config)
        if not from_file:
            self._initialise(name, config.init_weights)
        self.match_device(name)

    def _create(self, name: str, r: int, config) -> None:
        raise NotImplementedError

    def _initialise(self, name: str, init) -> None:
        raise NotImplementedError

    def _scale_rank_dropout(self, drop: torch.Tensor, name: str) -> torch.Tensor:
        return drop

    def training_delta(self, name: str) -> torch.Tensor:
        delta = self.delta_weight(name)
        p = self.rank_dropout[name]
        if self.training and p:
            drop = (torch.rand(delta.shape[0]) > p).to(delta.dtype)
            delta = delta * self._scale_rank_dropout(drop, name).to(delta.device).view(-1, 1)
        return delta

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout[name] and torch.rand(1).item() <= self.module_dropout[name]:
            return result  # module dropout: this step runs without the adapter
        return super().apply(name, x, result)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {attr: getattr(self, attr)[name] for attr in self.adapter_dict_names if name in getattr(self, attr)}


class LoHaLinear(_LycorisLayer):
    """LoHa around a linear-like layer."""

    adapter_dict_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        for attr in self.adapter_dict_names:
            setattr(self, attr, nn.ParameterDict())

    def _create(self, name: str, r: int, config: LoHaConfig) -> None:
        in_features, out_features = self.in_out
        self.hada_w1_a[name] = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b[name] = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a[name] = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b[name] = nn.Parameter(torch.empty(r, in_features))

    def _initialise(self, name: str, init) -> None:
        for attr in self.adapter_dict_names:
            _kaiming(getattr(self, attr)[name])
        if init:  # w2_b = 0: the product starts at zero, so the adapter starts as a no-op
            nn.init.zeros_(self.hada_w2_b[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        w1 = self.hada_w1_a[name] @ self.hada_w1_b[name]
        w2 = self.hada_w2_a[name] @ self.hada_w2_b[name]
        return w1 * w2 * self.scaling[name]

    def _scale_rank_dropout(self, drop: torch.Tensor, name: str) -> torch.Tensor:
        return drop / drop.mean()  # LoHa always rescales, as PEFT does


class LoKrLinear(_LycorisLayer):
    """LoKr around a linear-like layer."""

    adapter_dict_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        for attr in self.adapter_dict_names:
            setattr(self, attr, nn.ParameterDict())
        self.rank_dropout_scale: dict[str, bool] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.rank_dropout_scale.pop(name, None)

    def _create(self, name: str, r: int, config: LoKrConfig) -> None:
        in_features, out_features = self.in_out
        in_m, in_n = factorization(in_features, config.decompose_factor)
        out_l, out_k = factorization(out_features, config.decompose_factor)
        # w1 is (out_l, in_m), w2 is (out_k, in_n); a side large against r becomes a rank-r product
        use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = not (r < max(out_k, in_n) / 2)
        if use_w1:
            self.lokr_w1[name] = nn.Parameter(torch.empty(out_l, in_m))
        else:
            self.lokr_w1_a[name] = nn.Parameter(torch.empty(out_l, r))
            self.lokr_w1_b[name] = nn.Parameter(torch.empty(r, in_m))
        if use_w2:
            self.lokr_w2[name] = nn.Parameter(torch.empty(out_k, in_n))
        else:
            self.lokr_w2_a[name] = nn.Parameter(torch.empty(out_k, r))
            self.lokr_w2_b[name] = nn.Parameter(torch.empty(r, in_n))
        self.rank_dropout_scale[name] = config.rank_dropout_scale

    def _initialise(self, name: str, init) -> None:
        for attr in self.adapter_dict_names:
            if name in getattr(self, attr):
                _kaiming(getattr(self, attr)[name])
        if init is True:  # w1 (or its first factor) = 0
            nn.init.zeros_(self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name])
        elif init == "lycoris":  # w2 (or its second factor) = 0, as LyCORIS initialises
            nn.init.zeros_(self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_b[name])

    def _factor(self, name: str, which: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{which}")
        if name in full:
            return full[name]
        return getattr(self, f"lokr_{which}_a")[name] @ getattr(self, f"lokr_{which}_b")[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        return torch.kron(self._factor(name, "w1"), self._factor(name, "w2").contiguous()) * self.scaling[name]

    def _scale_rank_dropout(self, drop: torch.Tensor, name: str) -> torch.Tensor:
        return drop / drop.mean() if self.rank_dropout_scale[name] else drop


def _make(layer_class):
    def make(module: nn.Module, config, key: str):
        check_linear_like(module, config.peft_type)
        return layer_class(module)
    return make


register_method("LOHA", LayerMethod(LoHaLinear, _make(LoHaLinear)))
register_method("LOKR", LayerMethod(LoKrLinear, _make(LoKrLinear)))
