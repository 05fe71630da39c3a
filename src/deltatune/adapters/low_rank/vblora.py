"""VB-LoRA layers: LoRA factors assembled from a bank of vectors shared by all layers.

Per adapter, one trained bank ``V`` (num_vectors, L) with ``L = vector_length`` lives on the
model (``VectorBanks``, file key ``base_model.vblora_vector_bank``). Each layer learns logits
``vblora_logits_A`` (r, in/L, N) and ``vblora_logits_B`` (out/L, r, N); every length-L piece of
``A``'s rows and ``B``'s columns is the softmax-weighted sum of the ``topk`` bank vectors with
the highest logits. Then ``A`` is (r, in), ``B`` is (out, r) and the update is ``B @ A`` (no
scale). With ``save_only_topk_weights`` files hold, per logits tensor, ``<name>_topk_indices``
(the smallest integer type that holds ``num_vectors``) and ``<name>_topk_weights`` (the top-k
softmax weights but the last, which is one minus their sum), as PEFT writes them; loading such
a file rebuilds logits that are −∞ outside the top k, which gives the same factors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...config.low_rank import VBLoRAConfig
from ...targeting import find_targets
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import FILE_PREFIX, LayerMethod, register_method
from ..shared import TrainedOncePerAdapter

BANK_ATTR = "deltatune_vblora_banks"
BANK_KEY = "base_model.vblora_vector_bank"
LOGITS = ("vblora_logits_A", "vblora_logits_B")


class VectorBanks(TrainedOncePerAdapter):
    """Each VB-LoRA adapter's vector bank: a trained tensor that all its layers read."""

    attribute = "vblora_vector_bank"

    def __init__(self) -> None:
        super().__init__(nn.ParameterDict())


def index_dtype(num_vectors: int) -> torch.dtype:
    """The integer type PEFT stores top-k indices in for a bank of ``num_vectors``."""
    if num_vectors < 2 ** 8:
        return torch.uint8
    if num_vectors < 2 ** 15:
        return torch.int16
    return torch.int32 if num_vectors < 2 ** 31 else torch.int64


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., N) logits -> (..., L): the softmax-weighted sum of the top-k bank vectors."""
    top, indices = logits.topk(topk, dim=-1)
    weights = torch.softmax(top, dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


class VBLoRALinear(LinearAdapterLayer):
    adapter_dict_names = LOGITS

    def __init__(self, base_layer: nn.Module, banks: VectorBanks, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.vblora_logits_A = nn.ParameterDict()
        self.vblora_logits_B = nn.ParameterDict()
        self.vblora_dropout = nn.ModuleDict()
        self._banks = (banks,)  # a reference, not a submodule: the banks are registered once on the model
        self.topk: dict[str, int] = {}
        self.topk_only: dict[str, bool] = {}  # loaded from a top-k file: logits are −∞ outside the top k
        self._topk_files: dict[str, Optional[torch.dtype]] = {}  # index dtype when saving top-k only

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for holder in (self.topk, self.topk_only, self._topk_files):
            holder.pop(name, None)
        if name in self.vblora_dropout:
            del self.vblora_dropout[name]

    def add(self, name: str, config: VBLoRAConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        length = config.vector_length
        if in_features % length or out_features % length:
            raise ValueError(f"VBLoRAConfig.vector_length={length} must divide the input ({in_features}) and output "
                             f"({out_features}) sizes of module {key!r}")
        std = config.init_logits_std
        self.vblora_logits_A[name] = nn.Parameter(torch.randn(config.r, in_features // length, config.num_vectors) * std)
        self.vblora_logits_B[name] = nn.Parameter(torch.randn(out_features // length, config.r, config.num_vectors) * std)
        self.vblora_dropout[name] = nn.Dropout(config.vblora_dropout) if config.vblora_dropout > 0 else nn.Identity()
        self.topk[name] = config.topk
        self.topk_only[name] = False
        self._topk_files[name] = index_dtype(config.num_vectors) if config.save_only_topk_weights else None
        self.scaling[name] = 1.0
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        indices_dtype = self._topk_files[name]
        if indices_dtype is None:
            return {kind: getattr(self, kind)[name] for kind in LOGITS}
        out = {}
        for kind in LOGITS:  # derived copies: what the file holds, not live tensors
            top, indices = getattr(self, kind)[name].detach().topk(self.topk[name], dim=-1)
            out[f"{kind}_topk_indices"] = indices.to(indices_dtype)
            out[f"{kind}_topk_weights"] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
        return out

    def load_topk(self, name: str, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Rebuild the logits from a top-k file's indices and weights (keys ``prefix`` + name)."""
        for kind in LOGITS:
            logits = getattr(self, kind)[name]
            indices = tensors[f"{prefix}{kind}_topk_indices"].long()
            weights = tensors[f"{prefix}{kind}_topk_weights"].float()
            if indices.shape[:-1] != logits.shape[:-1] or indices.shape[-1] != self.topk[name] \
                    or weights.shape[:-1] != logits.shape[:-1] or weights.shape[-1] != self.topk[name] - 1:
                raise ValueError(f"{prefix}{kind}_topk_indices/_topk_weights have shapes {tuple(indices.shape)}/"
                                 f"{tuple(weights.shape)} in the file; this model needs {tuple(logits.shape[:-1])} "
                                 f"with topk={self.topk[name]}")
            if indices.numel() and (indices.min() < 0 or indices.max() >= logits.shape[-1]):
                raise ValueError(f"{prefix}{kind}_topk_indices: indices outside the bank of {logits.shape[-1]}")
            weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)  # the last one was left out
            rebuilt = torch.full(logits.shape, float("-inf")).scatter(-1, indices, weights.log())
            with torch.no_grad():
                logits.copy_(rebuilt.to(logits.device, logits.dtype))
        self.topk_only[name] = True

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): A (r, in), B (out, r), in the logits' dtype."""
        logits_A, logits_B = self.vblora_logits_A[name], self.vblora_logits_B[name]
        bank = self._banks[0].vblora_vector_bank[name].to(logits_A.dtype)
        topk = self.topk[name]
        A = mix(logits_A, bank, topk).reshape(logits_A.shape[0], -1)
        # B's pieces are (out/L, r, L): its columns are laid out along L, so move L next to out/L
        B = mix(logits_B, bank, topk).transpose(1, 2).reshape(-1, logits_B.shape[1])
        return A, B

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.training and self.topk_only[name]:
            raise RuntimeError(f"VB-LoRA adapter {name!r} was loaded from a file saved with save_only_topk_weights: "
                               "it can be used and merged, not trained")
        A, B = self.factors(name)
        x = self.vblora_dropout[name](x.to(A.dtype))
        return result + nn.functional.linear(nn.functional.linear(x, A), B)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        A, B = self.factors(name)
        delta = (B.detach().float() @ A.detach().float()).to(weight.device)
        return self.canonical(self.canonical(weight) + delta)


class VBLoRAMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(VBLoRALinear, self._make, bias_only="vblora_only")
        self._banks: Optional[VectorBanks] = None

    def _make(self, module: nn.Module, config: VBLoRAConfig, key: str) -> VBLoRALinear:
        check_linear_like(module, "VB-LoRA")
        return VBLoRALinear(module, self._banks, config.fan_in_fan_out)

    def inject(self, model: nn.Module, config: VBLoRAConfig, name: str, from_file: bool) -> None:
        banks = getattr(model, BANK_ATTR, None)
        if banks is None:
            banks = VectorBanks()
            setattr(model, BANK_ATTR, banks)
        targets = find_targets(model, config)
        reference = getattr(targets[0][1], "base_layer", targets[0][1]) if targets else None
        weight = getattr(reference, "weight", None)
        device = weight.device if weight is not None and not weight.is_meta else next(model.parameters()).device
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        bound = config.init_vector_bank_bound
        bank = torch.empty(config.num_vectors, config.vector_length).uniform_(-bound, bound)
        banks.vblora_vector_bank[name] = nn.Parameter(bank.to(device, dtype))
        self._banks = banks
        try:
            super().inject(model, config, name, from_file)
        finally:
            self._banks = None

    def remove(self, model: nn.Module, name: str) -> None:
        banks = getattr(model, BANK_ATTR, None)
        if banks is None:
            return
        banks.delete_adapter(name)
        if not banks.adapter_names:
            delattr(model, BANK_ATTR)

    def file_tensors(self, model: nn.Module, name: str, config: VBLoRAConfig) -> dict[str, torch.Tensor]:
        out = super().file_tensors(model, name, config)
        out[BANK_KEY] = getattr(model, BANK_ATTR).vblora_vector_bank[name]
        return out

    def prepare_load(self, model: nn.Module, name: str, config: VBLoRAConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """A top-k file: rebuild each layer's logits now (the file keys name derived tensors)."""
        if not config.save_only_topk_weights:
            return
        for key, layer in model.named_modules():
            if isinstance(layer, VBLoRALinear) and layer.has_adapter(name):
                prefix = f"{FILE_PREFIX}{key}."
                if all(f"{prefix}{kind}_topk_{part}" in tensors for kind in LOGITS for part in ("indices", "weights")):
                    layer.load_topk(name, tensors, prefix)


register_method("VBLORA", VBLoRAMethod())
