"""LoRA, rsLoRA and DoRA layers for ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding``.

Forward: ``y = base(x) + Σ_active scale · B(A(dropout(x)))`` with ``scale = alpha / r``
(``alpha / √r`` for rsLoRA). DoRA rescales each output row by ``m / ||W + scale·BA||``,
the norm treated as a constant in the backward pass (paper, §4.3).

Tensors are kept under PEFT's attribute names (``lora_A``, ``lora_B``, ``lora_embedding_A``,
``lora_embedding_B``, ``lora_magnitude_vector``), so saving is a rename of state-dict keys.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ... import kernels
from ...config import LoraConfig
from ...quant.layers import QuantLinear
from ...targeting import pattern_value
from ..linear_base import LinearAdapterLayer, stored_transposed
from .lora_options.layer_replication import SHARED_BASE_ATTR
from .lora_options.lora_variant import LoraVariant
from .lora_inits.init_principal import initialise_olora, initialise_pissa
from .lora_inits.init_weight_free import FROZEN_B_INITS, initialise_weight_free, refuse_unimplemented
from .lora_inits.loftq import initialise_loftq


def dora_row_norms(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA's starting magnitude: the float32 norm of each row of ``weight + delta`` ((out, in)
    layout). Rows are independent, so a shard of rows gets its own part of the vector."""
    return torch.linalg.norm(weight.float() + delta.to(weight.device), dim=1)


class Magnitude(nn.Module):
    """DoRA's learned per-output magnitude; a module so its key reads ``...<name>.weight`` like PEFT's."""

    def __init__(self, vector: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(vector)


class LoraLayer(LinearAdapterLayer):
    """Shared logic of the LoRA layers; ``transposed`` is True when the stored weight is (in, out)."""

    adapter_dict_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, transposed: bool):
        super().__init__(base_layer)
        self.transposed = transposed  # embeddings are looked up transposed; decided by the subclass
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        # DyLoRA's nested ranks: the rank an adapter is cut to outside training (merging, saving at
        # a rank, evaluation), and the rank drawn for the current training step; absent: all of r
        self.rank_limit: dict[str, int] = {}
        self.step_rank: dict[str, int] = {}
        # DoRA norms per adapter, and the base weight's squared row norms: (what they were computed from, value)
        self._dora_norms: dict[str, tuple] = {}
        self._weight_rows_sq: Optional[tuple] = None
        # adapters whose B factor stays frozen (MiCA trains A only, as PEFT's MiCA variant)
        self.frozen_b: set[str] = set()
        # adapters whose update is a LoRA variant's (aLoRA, QA-LoRA: lora_options/lora_variant.py), not plain B A x
        self.variants: dict[str, LoraVariant] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for table in (self.r, self.lora_alpha, self.use_rslora, self.rank_limit, self.step_rank, self._dora_norms):
            table.pop(name, None)
        self.frozen_b.discard(name)
        self.variants.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def has_adapter(self, name: str) -> bool:
        # A variant may stand for an adapter without factors of its own on this layer: X-LoRA's
        # mixture of expert LoRA adapters (adapters/mixture/xlora.py).
        return name in self.scaling or name in self.variants

    # ----- factors -----------------------------------------------------------------------
    def full_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as stored, all ``r`` components: ``B @ A`` in (out, in) layout."""
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with ``B @ A`` the unscaled update in (out, in) layout, cut to the adapter's
        rank limit (views: writes and gradients reach the stored tensors)."""
        return self._cut(name, self.rank_limit.get(name))

    def live_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) the next forward pass uses: in training, the rank drawn for the step."""
        rank = self.step_rank.get(name) if self.training else None
        if rank is None:
            return (*self.factors(name), self.scaling[name])
        return (*self._cut(name, rank), self.rank_scale(name, rank))

    def _cut(self, name: str, rank: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.full_factors(name)
        if rank is None or rank >= A.shape[0]:
            return A, B
        return A[:rank], B[:, :rank]

    def rank_scale(self, name: str, rank: int) -> float:
        """The update's scale at ``rank`` components: alpha / rank (alpha / √rank for rsLoRA), as
        a LoRA adapter of that rank would have."""
        rank = min(rank, self.r[name])
        return self.lora_alpha[name] / (math.sqrt(rank) if self.use_rslora[name] else rank)

    def set_rank_limit(self, name: str, rank: Optional[int]) -> None:
        """Cut adapter ``name`` to its first ``rank`` components (None: all ``r``) for everything
        but training steps; the scale follows the rank."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before changing its rank")
        if rank is None or rank >= self.r[name]:
            self.rank_limit.pop(name, None)
        else:
            self.rank_limit[name] = rank
        self.scaling[name] = self.rank_scale(name, self.rank_limit.get(name, self.r[name]))

    def set_factors(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Overwrite adapter ``name``'s factors (shapes must match)."""
        old_A, old_B = self.factors(name)
        with torch.no_grad():
            old_A.copy_(A)
            old_B.copy_(B)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale · B @ A`` in (out, in) layout, float32."""
        if name in self.variants and (delta := self.variants[name].delta_weight(self, name)) is not None:
            return delta
        A, B = self.factors(name)
        return (B.float() @ A.float()) * self.scaling[name]

    # ----- adding ------------------------------------------------------------------------
    def add(self, name: str, config: LoraConfig, key: str, from_file: bool = False) -> None:
        """Create adapter ``name`` for the module called ``key``; with ``from_file`` the values will
        be loaded, so skip initialisation."""
        if name in self.adapter_names:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.use_rslora[name] = config.use_rslora
        self.scaling[name] = self.rank_scale(name, r)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self._create(name, r, config)
        if not from_file and config.init_lora_weights == "loftq":  # quantizes the base too (loftq.py)
            initialise_loftq(self, name, config.loftq_config)
        elif not from_file:
            refuse_unimplemented(config.init_lora_weights)
            self._initialise(name, config.init_lora_weights)
        if config.use_dora:
            weight = self.canonical(self.base_weight().detach())
            norm = dora_row_norms(weight, self.delta_weight(name))
            self.lora_magnitude_vector[name] = Magnitude(norm.to(weight.dtype))
        self.match_device(name)
        if config.init_lora_weights in FROZEN_B_INITS:
            self.frozen_b.add(name)
            for key, tensor in self.file_tensors(name).items():
                if key.startswith(("lora_B", "lora_embedding_B")):
                    tensor.requires_grad_(False)

    def adapter_parameters(self, name: str):
        """The parameters adapter ``name`` trains: all of its tensors but a frozen B (MiCA)."""
        frozen = set()
        if name in self.frozen_b:
            frozen = {id(t) for k, t in self.file_tensors(name).items() if k.startswith(("lora_B", "lora_embedding_B"))}
        return (p for p in super().adapter_parameters(name) if id(p) not in frozen)

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        raise NotImplementedError

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Sub-key -> live tensor of adapter ``name``, as PEFT names them."""
        out: dict[str, torch.Tensor] = {}
        for attr in ("lora_A", "lora_B"):
            if name in getattr(self, attr):
                for sub, p in getattr(self, attr)[name].named_parameters():
                    out[f"{attr}.{sub}"] = p
        for attr in ("lora_embedding_A", "lora_embedding_B"):
            if name in getattr(self, attr):
                out[attr] = getattr(self, attr)[name]
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        if name in self.variants:
            out.update(self.variants[name].file_tensors(self, name))
        return out

    def _initialise(self, name: str, init: Union[bool, str]) -> None:
        raise NotImplementedError

    # ----- merging -----------------------------------------------------------------------
    def merge_step(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   original_weight: torch.Tensor, original_bias: Optional[torch.Tensor],
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        delta = self.delta_weight(name).to(weight.device)
        current = self.canonical(weight)
        if bias is not None:
            bias = self.merge_bias_into(name, bias)
        if name not in self.lora_magnitude_vector:
            return self.canonical(current + delta), bias
        factor = self._dora_factor(name, self.canonical(original_weight), delta).float()
        if bias is not None:
            # DoRA rescales the output less the base layer's own bias (``apply``), so LoRA biases
            # merged before it are rescaled too, and the original bias is not.
            bias = original_bias + factor * (bias - original_bias)
        return self.canonical(factor.view(-1, 1) * (current + delta)), bias

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return self.merge_step(name, weight, None, original, None)[0]

    def _dora_factor(self, name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        magnitude = self.lora_magnitude_vector[name].weight
        return kernels.dora_factor(weight.to(magnitude.dtype), delta.to(magnitude.dtype), magnitude)


class LoraLinear(LoraLayer):
    """LoRA/DoRA around ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored as (in, out))."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer, transposed=stored_transposed(base_layer, fan_in_fan_out))

    def full_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        in_features, out_features = self.in_out
        self.lora_A[name] = nn.Linear(in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, out_features, bias=config.lora_bias)

    def _initialise(self, name: str, init: Union[bool, str]) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        if init is False:  # both factors random (nn.Linear's default), so the adapter changes outputs
            return
        if init is True:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A.weight, std=1 / self.r[name])
        elif isinstance(init, str) and init.startswith("pissa"):
            initialise_pissa(self, name, init)
            return
        elif init == "olora":
            initialise_olora(self, name)
            return
        elif init in ("orthogonal", "mica"):
            initialise_weight_free(self, name, init)
            return
        nn.init.zeros_(B.weight)
        if B.bias is not None:
            nn.init.zeros_(B.bias)

    def dropout_p(self, name: str) -> float:
        """Adapter ``name``'s dropout probability as the next forward pass applies it (0 in eval)."""
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def _single_fused_adapter(self) -> Optional[str]:
        """The adapter the whole layer can run as one ``kernels.lora_linear`` call, if any: a dense
        base, exactly one unmerged active LoRA adapter (not DoRA), no per-row plan."""
        if self.disabled or self.row_plan is not None or not self._plain_base():
            return None
        names = [n for n in self.active_adapters if self.has_adapter(n) and n not in self.merged_adapters]
        if len(names) != 1 or names[0] in self.lora_magnitude_vector or names[0] in self.variants:
            return None
        weight = self.base_layer.weight
        same_dtype = self.lora_A[names[0]].weight.dtype == weight.dtype
        return names[0] if same_dtype or torch.is_autocast_enabled(weight.device.type) else None

    def _plain_base(self) -> bool:
        """The base computes exactly ``x Wᵀ + b`` (a subclass may do more in its forward, and a hook
        on it expects to run), so one op may stand in for it."""
        base = self.base_layer
        plain = type(base) is nn.Linear or type(base).__name__ == "Conv1D"
        return plain and not (base._forward_hooks or base._forward_pre_hooks)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self._single_fused_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        A, B, scale = self.live_factors(name)
        return kernels.lora_linear(x, self.base_layer.weight, self.base_layer.bias, A, B, self.lora_B[name].bias,
                                   scale, self.dropout_p(name), transposed=self.transposed)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if name in self.variants:
            return self.variants[name].apply(self, name, x, result)
        if name not in self.lora_magnitude_vector:
            A, B, scale = self.live_factors(name)
            return kernels.lora_add(x, result, A, B, self.lora_B[name].bias, scale, self.dropout_p(name))
        A, B = self.lora_A[name], self.lora_B[name]  # DoRA has no rank limit (DyLoRA refuses it)
        scale = self.scaling[name]
        magnitude = self.lora_magnitude_vector[name].weight
        norm = self._dora_norm(name)
        p = self.dropout_p(name)
        if p == 0:
            return kernels.dora_add(x, result, getattr(self.base_layer, "bias", None), A.weight, B.weight,
                                    magnitude, norm, scale)
        if self._result_is_base_output(name) and not self.base_layer.weight.requires_grad:
            return kernels.dora_dropout_add(x, result, self.base_layer.bias, self.canonical(self.base_layer.weight),
                                            A.weight, B.weight, magnitude, norm, scale, p)
        # DoRA's base term reads the dropped-out input: a second base matmul (a quantized base
        # recomputes its weight in backward instead of saving it).
        x = kernels.dropout(x.to(A.weight.dtype), p)  # drawn as the fused ops draw it
        base_part = (self.base_layer.matmul(x) if self.quantized
                     else kernels.linear_no_bias(x, self.canonical(self.base_weight()).to(x.dtype)))
        factor = magnitude / norm.to(magnitude.dtype)
        return result + (factor - 1) * base_part + factor * kernels.lora_delta(x, A, B, scale)

    def _result_is_base_output(self, name: str) -> bool:
        """Whether the ``result`` adapter ``name`` is applied to is exactly ``x Wᵀ + b``: a plain
        dense base, and no other unmerged adapter applied to these rows before this one."""
        if not self._plain_base():
            return False
        if self.row_plan is not None:
            return True  # each routed row group gets one adapter
        first = next((n for n in self.active_adapters if self.has_adapter(n) and n not in self.merged_adapters), None)
        return first == name

    def _dora_norm(self, name: str) -> torch.Tensor:
        """``||W + scale·BA||`` per output row, kept until A, B or the base weight change (once per
        optimizer step, not per micro-batch or per recomputation under checkpointing)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        stored = self.base_layer.weight  # a quantized layer's packed bytes: re-quantizing replaces them
        key = (A._version, B._version, A.data_ptr(), B.data_ptr(), self.scaling[name],
               (stored._version, stored.data_ptr()))
        if name in self._dora_norms and self._dora_norms[name][0] == key:
            return self._dora_norms[name][1]
        stale = self._weight_rows_sq is None or self._weight_rows_sq[0] != key[-1]
        if self.quantized:
            # A 4-bit or 8-bit base: ``W Aᵀ`` is the layer's own matmul of A (on a GPU the weight is
            # decoded inside the kernel's tiles), and the weight is formed once for ``||W_i||²``.
            if stale:
                self._weight_rows_sq = (key[-1], kernels.weight_row_norms_sq(self.base_layer.dequantize()))
            with torch.no_grad():
                weight_a = self.base_layer.matmul(A.detach().to(self.base_layer.compute_dtype)).T
            norm = kernels.dora_norm_from_product(weight_a, A.detach(), B.detach(), self.scaling[name],
                                                  self._weight_rows_sq[1])
        else:
            weight = self.canonical(self.base_weight().detach())
            if stale:
                self._weight_rows_sq = (key[-1], kernels.weight_row_norms_sq(weight))
            norm = kernels.dora_weight_norm(weight, A.detach(), B.detach(), self.scaling[name],
                                            self._weight_rows_sq[1])
        self._dora_norms[name] = (key, norm)
        return norm

    def merge_bias_into(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        B = self.lora_B[name]
        if B.bias is None:
            return bias
        return bias + B.bias.detach().float() * self.scaling[name]

    def merge_problem(self, name: str) -> Optional[str]:
        if name in self.variants and (problem := self.variants[name].merge_problem(self, name)):
            return problem
        if self.lora_B[name].bias is not None and self.bias is None:
            # Merging would need a bias the base model does not have (PEFT refuses it too).
            return ("it has a LoRA bias (lora_bias=True) but the base layer has no bias to merge it into; "
                    "keep the adapter unmerged")
        if self.lora_B[name].bias is not None and getattr(self.base_layer, SHARED_BASE_ATTR, False):
            return ("its LoRA bias would change a base bias that layer_replication shares between positions; "
                    "keep the adapter unmerged")
        return None


class LoraEmbedding(LoraLayer):
    """LoRA/DoRA around ``nn.Embedding``: rows of ``A.T`` are looked up, then projected by ``B.T``."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer, transposed=True)

    def full_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        if config.lora_bias:
            raise ValueError("LoraConfig.lora_bias=True is not supported for embedding layers")
        num_embeddings, dim = self.base_weight().shape
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num_embeddings))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r))

    def _initialise(self, name: str, init: Union[bool, str]) -> None:
        if init is False:
            return
        if init == "mica":
            initialise_weight_free(self, name, init)
            return
        if init not in (True, "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} is not supported for embedding layers")
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if name in self.variants:  # X-LoRA's experts on an embedding (adapters/mixture/xlora.py)
            return self.variants[name].apply(self, name, x, result)
        A, B, scale = self.live_factors(name)
        delta = kernels.embedding_delta(x, A, B, scale, self.base_layer)
        embed_scale = kernels.embed_scale_of(self.base_layer)
        if embed_scale is not None:
            delta = delta * (embed_scale.to(delta.dtype) if isinstance(embed_scale, torch.Tensor) else embed_scale)
        if name not in self.lora_magnitude_vector:
            return result + delta
        weight = self.canonical(self.base_weight())
        factor = self._dora_factor(name, weight, ((B @ A) * scale).detach())
        return factor * result + factor * delta


def make_lora_layer(module: nn.Module, config: LoraConfig, key: str = "") -> LoraLayer:
    """Wrap a base module in the matching LoRA layer, or say which types are supported."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, QuantLinear):
        return LoraLinear(module)
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return LoraLinear(module, fan_in_fan_out=config.fan_in_fan_out)
    raise TypeError(
        f"LoRA cannot wrap a {type(module).__name__}; supported base layers are nn.Linear, "
        "GPT-2 Conv1D, nn.Embedding and deltatune's quantized linear layers"
    )
