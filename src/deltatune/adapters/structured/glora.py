"""GLoRA layers: a frozen linear layer's weight and bias rewritten by five small terms.

``W' = W0 + W0 ⊙ A + B`` and ``b' = b0 + b0 ⊙ D + E + W0 C``, where ``W0``/``b0`` are the
unmerged base tensors (``W0`` dequantized for a 4-bit base). Each term is a rank-``r`` product,
a vector, one constant or nothing (the config's ``config_A_B``, ``config_C``, ``config_D_E``);
a layer without a bias has no C, D or E. Files hold ``glora_<X>.Xd``/``.Xu`` (products) or
``glora_<X>.X`` (vectors and constants) per layer, and ``glora_<X>.zeros`` for the terms that
are nothing, as PEFT writes them; deltatune rebuilds those zeros instead of keeping them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ...config.structured import GloraConfig
from ...quant.layers import QuantLinear
from ..linear_base import LinearAdapterLayer
from ..method import FILE_PREFIX, LayerMethod, register_method

TERMS = ("A", "B", "C", "D", "E")


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # LoRA's draw for its first factor


class GloraTerm(nn.Module):
    """One term of one adapter; ``value`` is the tensor the formula uses, or None for zero."""

    kind = "none"

    def __init__(self, zeros_shape: tuple[int, ...]):
        super().__init__()
        self.zeros_shape = zeros_shape  # what PEFT stores for a zero term

    def value(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        return None


class GloraProduct(GloraTerm):
    """``Xd @ Xu``: (rows, r) @ (r, cols); ``Xu`` is drawn, ``Xd`` too unless starting at zero."""

    kind = "lora"

    def __init__(self, rows: int, cols: int, r: int, init_weights: bool):
        super().__init__((rows, cols))
        self.Xd = nn.Parameter(torch.zeros(rows, r))
        self.Xu = nn.Parameter(torch.zeros(r, cols))
        _kaiming(self.Xu.data)
        if not init_weights:
            _kaiming(self.Xd.data)

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        return self.Xd.to(dtype) @ self.Xu.to(dtype)


class GloraVector(GloraTerm):
    """One value per row: a (rows, 1) column for A, B and C, a (rows,) vector for D and E."""

    kind = "vector"

    def __init__(self, rows: int, column: bool, init_weights: bool):
        super().__init__((rows, 1) if column else (rows,))
        self.X = nn.Parameter(torch.zeros(self.zeros_shape))
        if not init_weights:
            # a column draws with fan-in 1 (uniform in ±1), a flat vector with fan-in ``rows``
            _kaiming(self.X.data if column else self.X.data.unsqueeze(0))

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        return self.X.to(dtype)


class GloraConstant(GloraTerm):
    """One number for the whole term, stored as a (1,) tensor."""

    kind = "constant"

    def __init__(self, init_weights: bool):
        super().__init__((1,))
        self.X = nn.Parameter(torch.zeros(1))
        if not init_weights:
            nn.init.normal_(self.X.data, std=0.02)

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        return self.X[0].to(dtype)


def _make_terms(config: GloraConfig, in_features: int, out_features: int, has_bias: bool) -> list[GloraTerm]:
    """A, B, C, D, E of one adapter, drawn in that order (PEFT's order, so a seed draws alike)."""
    r, init = config.r, config.init_weights
    terms: list[GloraTerm] = []
    for _ in "AB":
        if config.config_A_B == "lora":
            terms.append(GloraProduct(out_features, in_features, r, init))
        elif config.config_A_B == "vector":
            terms.append(GloraVector(out_features, True, init))
        elif config.config_A_B == "constant":
            terms.append(GloraConstant(init))
        else:
            terms.append(GloraTerm((out_features, in_features)))
    kind_c = config.config_C if has_bias else "none"  # without a bias, C, D and E have nothing to act on
    if kind_c == "lora":
        terms.append(GloraProduct(in_features, 1, r, init))
    elif kind_c == "vector":
        terms.append(GloraVector(in_features, True, init))
    else:
        terms.append(GloraTerm((in_features, 1)))
    kind_de = config.config_D_E if has_bias else "none"
    for _ in "DE":
        if kind_de == "vector":
            terms.append(GloraVector(out_features, False, init))
        elif kind_de == "constant":
            terms.append(GloraConstant(init))
        else:
            terms.append(GloraTerm((out_features,)))
    return terms


class GloraLinear(LinearAdapterLayer):
    adapter_dict_names = tuple(f"glora_{t}" for t in TERMS)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        for attr in self.adapter_dict_names:
            setattr(self, attr, nn.ModuleDict())
        self.r: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.r.pop(name, None)

    def add(self, name: str, config: GloraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        terms = _make_terms(config, in_features, out_features, self.bias is not None)
        for attr, term in zip(self.adapter_dict_names, terms):
            getattr(self, attr)[name] = term
        self.r[name] = config.r
        self.scaling[name] = 1.0
        self.match_device(name)

    def term(self, letter: str, name: str) -> GloraTerm:
        return getattr(self, f"glora_{letter}")[name]

    def adapter_dtype(self, name: str) -> torch.dtype:
        for p in self.adapter_parameters(name):
            return p.dtype
        weight = self.base_weight()
        return weight.dtype if weight.dtype.is_floating_point else torch.float32

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        device = self.base_weight().device
        for letter in TERMS:
            term = self.term(letter, name)
            prefix = f"glora_{letter}"
            if isinstance(term, GloraProduct):
                out[f"{prefix}.Xd"], out[f"{prefix}.Xu"] = term.Xd, term.Xu
            elif isinstance(term, (GloraVector, GloraConstant)):
                out[f"{prefix}.X"] = term.X
            else:  # a fresh tensor: what a file holds here is checked, not kept (see GloraMethod.prepare_load)
                out[f"{prefix}.zeros"] = torch.zeros(term.zeros_shape, dtype=self.adapter_dtype(name), device=device)
        return out

    # ----- the frozen tensors the terms act on ---------------------------------------------
    def frozen_weight(self) -> torch.Tensor:
        """``W0`` in (out, in) layout: the weight before any merge, dequantized for a 4-bit base."""
        return self.canonical(self.unmerged_weight().detach())

    def frozen_bias(self) -> Optional[torch.Tensor]:
        """``b0``: the bias before any merge; the live one otherwise, so that a bias trained with
        ``bias="glora_only"`` also gets the gradient of ``b0 ⊙ D``, as in PEFT."""
        if self._original_quant is not None:
            return self._original_quant[0].bias
        if self._original_bias is not None:
            return self._original_bias.to(self.base_weight().device)
        return self.bias

    def bias_delta(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``b0 ⊙ D + E + W0 C`` (out,), or None where the layer has no bias or no such term."""
        if bias is None:
            return None
        parts = []
        D, E, C = (self.term(t, name).value(dtype) for t in "DEC")
        if D is not None:
            parts.append(bias.to(dtype) * D)
        if E is not None:
            parts.append(E.expand(bias.shape))
        if C is not None:
            parts.append((weight @ C).squeeze(-1))
        return sum(parts[1:], parts[0]) if parts else None

    def weight_delta(self, name: str, weight: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``W0 ⊙ A + B`` in (out, in) layout, or None when both terms are zero."""
        A, B = self.term("A", name).value(dtype), self.term("B", name).value(dtype)
        delta = None if A is None else weight * A
        if B is not None:
            delta = B.expand(weight.shape) if delta is None else delta + B
        return delta

    # ----- forward and merge ---------------------------------------------------------------
    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dtype = self.adapter_dtype(name)
        weight = self.frozen_weight().to(dtype)
        x = x.to(dtype)
        A, B = self.term("A", name), self.term("B", name)
        out: Optional[torch.Tensor] = None
        if isinstance(A, GloraProduct):  # W0 ⊙ (Xd Xu) has full rank: it is formed, as PEFT does
            out = F.linear(x, weight * A.value(dtype))
        elif A.value(dtype) is not None:  # a vector or a constant scales the rows of W0 x
            out = F.linear(x, weight) * A.value(dtype).reshape(-1)
        if isinstance(B, GloraProduct):  # B x through the factors, never forming B
            term = F.linear(F.linear(x, B.Xu.to(dtype)), B.Xd.to(dtype))
            out = term if out is None else out + term
        elif B.value(dtype) is not None:  # every entry of a row of B is alike: B x = b · Σ x
            term = x.sum(-1, keepdim=True) * B.value(dtype).reshape(-1)
            out = term if out is None else out + term
        shift = self.bias_delta(name, weight, self.frozen_bias(), dtype)
        if shift is not None:
            out = shift if out is None else out + shift
        if out is None:
            return result
        return result + out.to(result.dtype)

    def merge_step(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   original_weight: torch.Tensor, original_bias: Optional[torch.Tensor],
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # every adapter's terms act on W0 and b0 (the originals), whatever was merged before
        w0 = self.canonical(original_weight)
        delta = self.weight_delta(name, w0, torch.float32)
        if delta is not None:
            weight = self.canonical(self.canonical(weight) + delta.detach().to(weight.device))
        shift = self.bias_delta(name, w0, original_bias, torch.float32)
        if bias is not None and shift is not None:
            bias = bias + shift.detach().to(bias.device)
        return weight, bias


class GloraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(GloraLinear, bias_only="glora_only")

    def _make(self, module: nn.Module, config: GloraConfig, key: str) -> GloraLinear:
        # PEFT's GLoRA wraps plain nn.Linear only; deltatune's 4-bit linears work too (W0 dequantized)
        if type(module) is not nn.Linear and not isinstance(module, QuantLinear):
            raise TypeError(f"GLoRA cannot wrap a {type(module).__name__}; it adapts plain nn.Linear layers (and "
                            "deltatune's quantized linears), as PEFT's GLoRA does (GPT-2's Conv1D is not one)")
        return GloraLinear(module)

    def file_tensors(self, model: nn.Module, name: str, config: GloraConfig) -> dict[str, torch.Tensor]:
        out = super().file_tensors(model, name, config)
        # PEFT also stores the base weight of a targeted embedding or output head (its
        # save_embedding_layers rule for target lists naming embed_tokens or lm_head)
        targets = config.target_modules
        if isinstance(targets, list) and any(n in targets for n in ("embed_tokens", "lm_head")):
            keys = {id(m): k for k, m in model.named_modules()}
            for getter in ("get_input_embeddings", "get_output_embeddings"):
                layer = getattr(model, getter)() if hasattr(model, getter) else None
                if isinstance(layer, GloraLinear) and layer.has_adapter(name) and id(layer) in keys:
                    out[f"{FILE_PREFIX}{keys[id(layer)]}.base_layer.weight"] = layer.base_layer.weight
        return out

    def prepare_load(self, model: nn.Module, name: str, config: GloraConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """A zero term's ``zeros`` tensor is rebuilt, not kept: a file whose zeros are not zero
        would compute something else in PEFT, so it is refused."""
        for key, value in tensors.items():
            if key.endswith(".zeros") and value.is_floating_point() and value.count_nonzero() > 0:
                raise ValueError(f"key {key!r} holds non-zero values, but GLoRA keeps that term at zero "
                                 f"(config_A_B={config.config_A_B!r}, config_C={config.config_C!r}, "
                                 f"config_D_E={config.config_D_E!r})")


register_method("GLORA", GloraMethod())
