"""Super-Tuning layers: the frozen weight plus a sparse support of trained single entries,
picked by weight magnitude, optionally plus a LoRA pair (the "Supra" hybrid).

Each layer trains ``int(numel · (1 - sparsity))`` entries. Which ones: ``torch.topk`` of the
flattened ``|W|`` (largest with ``select_top``, else smallest), taken on the weight in its own
dtype and device exactly as PEFT takes it, so ties fall the same way; the positions are kept
in topk's order (by score, not by position) as an int32 vector of flat row-major (out, in)
positions, ``supertuning_indices``, aligned with the trained ``supertuning_values``. The file
stores the positions unless ``save_precomputed_indices`` is false; then loading picks them
again from the base weight. A quantized base is scored on its dequantized weight (in the
layer's compute dtype). Only ``nn.Linear`` and deltatune's quantized linears are wrapped, as
PEFT wraps only ``nn.Linear``: for GPT-2's ``Conv1D`` (weight stored (in, out)) PEFT defines
no order of the flat positions, so a file for it would load nowhere else.

Supra: ``supertuning_lora_A`` (r, in) and ``supertuning_lora_B`` (out, r), bias-free linears
as in PEFT, add ``(lora_alpha / r) · B A dropout(x)``; dropout reaches the LoRA input only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config import AdapterConfig, SupertuningConfig
from ...quant.layers import QuantLinear
from ..linear_base import WeightDeltaLayer
from ..method import FILE_PREFIX, LayerMethod, register_method
from ..shared import UnsavedBuffers


def support_size(numel: int, sparsity: float) -> int:
    """How many entries a weight of ``numel`` entries trains: PEFT's float product, truncated."""
    return int(numel * (1 - sparsity))


def magnitude_support(weight: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """(count,) int32 flat positions of the ``count`` largest (or smallest) ``|weight|`` entries,
    in topk's order; scored in the weight's own dtype and device, so ties break as PEFT's do."""
    scores = weight.detach().abs().flatten()
    return torch.topk(scores, k=count, largest=largest).indices.to(torch.int32)


class SupertuningLinear(WeightDeltaLayer):
    """Super-Tuning around an ``nn.Linear`` or a quantized linear."""

    adapter_dict_names = ("supertuning_values", "supertuning_lora_A", "supertuning_lora_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.supertuning_values = nn.ParameterDict()
        self.supertuning_indices = UnsavedBuffers()
        self.supertuning_lora_A = nn.ModuleDict()
        self.supertuning_lora_B = nn.ModuleDict()
        self.supertuning_lora_dropout = nn.ModuleDict()
        self.save_indices: dict[str, bool] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.save_indices.pop(name, None)
        if name in self.supertuning_indices:
            del self.supertuning_indices[name]
        if name in self.supertuning_lora_dropout:
            del self.supertuning_lora_dropout[name]

    def add(self, name: str, config: SupertuningConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        count = support_size(in_features * out_features, config.sparsity)
        if count < 1:
            raise ValueError(f"SupertuningConfig.sparsity = {config.sparsity} leaves no entry to train in the "
                             f"{out_features}x{in_features} weight of {key!r}; choose a lower sparsity")
        if from_file and config.save_precomputed_indices:
            positions = torch.zeros(count, dtype=torch.int32)  # the file's supertuning_indices fill these in
        else:
            # the weight before any merge, so a support never depends on what is merged meanwhile
            positions = magnitude_support(self.unmerged_weight(), count, config.select_top)
        # the draws in PEFT's order and on its device (values, then the two linears' own init, then
        # A and B again), so a seeded random start is PEFT's
        device = positions.device
        values = torch.zeros(count, device=device) if config.init_weights else torch.randn(count, device=device)
        self.supertuning_values[name] = nn.Parameter(values)
        if config.r is not None:
            A = nn.Linear(in_features, config.r, bias=False, device=device)
            B = nn.Linear(config.r, out_features, bias=False, device=device)
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(B.weight)
            else:
                nn.init.kaiming_uniform_(B.weight, a=math.sqrt(5))
            self.supertuning_lora_A[name], self.supertuning_lora_B[name] = A, B
            dropout = config.lora_dropout
            self.supertuning_lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.scaling[name] = config.lora_alpha / config.r
        else:
            self.scaling[name] = 1.0  # Super alone: the values are the update itself
        self.save_indices[name] = config.save_precomputed_indices
        self.match_device(name)
        self.supertuning_indices[name] = positions.to(self.supertuning_values[name].device)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {"supertuning_values": self.supertuning_values[name]}
        if self.save_indices[name]:
            out["supertuning_indices"] = self.supertuning_indices[name]
        if name in self.supertuning_lora_A:
            out["supertuning_lora_A.weight"] = self.supertuning_lora_A[name].weight
            out["supertuning_lora_B.weight"] = self.supertuning_lora_B[name].weight
        return out

    def sparse_delta(self, name: str) -> torch.Tensor:
        """The trained entries scattered into a zero (out, in) matrix, in the values' dtype
        (summed, as PEFT's scatter-add sums, should a file repeat a position)."""
        values = self.supertuning_values[name]
        in_features, out_features = self.in_out
        positions = self.supertuning_indices[name].to(values.device, torch.long)
        flat = values.new_zeros(out_features * in_features).scatter_add(0, positions, values)
        return flat.view(out_features, in_features)

    def lora_delta(self, name: str) -> torch.Tensor:
        """``(lora_alpha / r) · B A`` in (out, in) layout, float32."""
        A, B = self.supertuning_lora_A[name].weight, self.supertuning_lora_B[name].weight
        return self.scaling[name] * (B.float() @ A.float())

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        delta = self.sparse_delta(name)
        result = result + nn.functional.linear(x.to(delta.dtype), delta).to(result.dtype)
        if name in self.supertuning_lora_A:
            A, B = self.supertuning_lora_A[name], self.supertuning_lora_B[name]
            low_rank = B(A(self.supertuning_lora_dropout[name](x.to(A.weight.dtype))))
            result = result + (self.scaling[name] * low_rank).to(result.dtype)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` in (out, in) layout, float32: the scattered entries plus the LoRA product."""
        delta = self.sparse_delta(name).float()
        return delta + self.lora_delta(name) if name in self.supertuning_lora_A else delta

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        # PEFT's order: the entries are added in place first, the LoRA product after
        values = self.supertuning_values[name].detach().to(weight.device, torch.float32)
        positions = self.supertuning_indices[name].to(weight.device, torch.long)
        merged = weight.reshape(-1).scatter_add(0, positions, values).view_as(weight)
        if name in self.supertuning_lora_A:
            merged = merged + self.lora_delta(name).detach().to(weight.device)
        return merged


class SupertuningMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(SupertuningLinear, self._make)

    @staticmethod
    def _make(module: nn.Module, config: AdapterConfig, key: str) -> SupertuningLinear:
        if not isinstance(module, (nn.Linear, QuantLinear)):
            raise TypeError(
                f"Super-Tuning wraps nn.Linear layers (and deltatune's quantized linears) only, as PEFT 0.21.2 "
                f"does, not a {type(module).__name__}: for a weight stored (in, out), as GPT-2's Conv1D stores "
                "it, PEFT defines no order of the trained flat positions, so its file would load nowhere else"
            )
        return SupertuningLinear(module)

    def prepare_load(self, model: nn.Module, name: str, config: AdapterConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """Positions in a file must be int32 (PEFT's) or int64 and lie inside their layer's
        weight (each forward scatters into it); int64 ones are narrowed to int32, as kept here."""
        for key, layer in model.named_modules():
            file_key = f"{FILE_PREFIX}{key}.supertuning_indices"
            if not isinstance(layer, SupertuningLinear) or not layer.has_adapter(name) or file_key not in tensors:
                continue
            positions = tensors[file_key]
            if positions.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{file_key}: positions must be int32 (or int64), got {positions.dtype}")
            in_features, out_features = layer.in_out
            if positions.numel() and (positions.min() < 0 or positions.max() >= in_features * out_features):
                raise ValueError(f"{file_key}: positions outside the {out_features}x{in_features} weight "
                                 f"(flat positions 0..{in_features * out_features - 1})")
            tensors[file_key] = positions.to(torch.int32)


register_method("SUPERTUNING", SupertuningMethod())
