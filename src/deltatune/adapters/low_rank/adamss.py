"""AdaMSS layers: low-rank updates trained per cluster of output rows, inside the top singular
space of the weight.

Per targeted linear layer (see ``AdamssConfig``) the frozen ``Vᵀ`` (``adamss_newB``, R × (in [+1]))
projects the input (with a 1 appended when the layer has a bias, as the bias is an extra column of
the decomposed weight), each cluster ``k`` maps the projection through its trained ``A_k`` (r_k, R)
and ``B_k`` (rows_k, r_k), and the clusters' outputs are put back at their rows:
``ΔW [x; 1]`` with ``ΔW = P [B_1 A_1; …; B_K A_K] Vᵀ`` (``P`` the rows' placement). Merging adds
``ΔW``'s weight part to the weight and its last column to the bias.

Files hold ``adamss_A.<k>``, ``adamss_B.<k>`` and ``adamss_newB`` as PEFT writes them; which rows form
each cluster is never saved, so every load reclusters the base weight (``adamss_init``) exactly as
PEFT does. ASA (``use_asa``) is the method's ``after_step`` hook (``adamss_asa``).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config.adamss import AdamssConfig
from ..base import adapter_layers
from ..linear_base import LinearAdapterLayer, check_plain_linear
from ..method import FILE_PREFIX, LayerMethod, register_method
from ..shared import UnsavedBuffers
from .adamss_asa import SubspaceAllocator
from .adamss_init import decompose, start_factors, subspace_rank
from .tinylora import stored_dtype


class AdamssLinear(LinearAdapterLayer):
    """A linear layer with one small low-rank pair per k-means subspace of its output rows (AdaMSS)."""

    adapter_dict_names = ("adamss_A", "adamss_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adamss_A = nn.ModuleDict()  # name -> ParameterList, one (r_k, R) factor per cluster
        self.adamss_B = nn.ModuleDict()  # name -> ParameterList, one (rows_k, r_k) factor per cluster
        self.adamss_newB = UnsavedBuffers()  # frozen Vᵀ, rounded to the base's dtype; files carry it
        self.adamss_rows = UnsavedBuffers()  # each output row's position among the clusters' outputs
        self.cluster_rows: dict[str, list[int]] = {}  # rows per cluster: what a file's B must have
        self.frozen: dict[str, set[int]] = {}  # clusters ASA stopped training

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for holder in (self.adamss_newB, self.adamss_rows):
            if name in holder:
                del holder[name]
        self.cluster_rows.pop(name, None)
        self.frozen.pop(name, None)

    def compute_dtype(self) -> torch.dtype:
        """The dtype PEFT computes the update in: the base weight's."""
        if self.quantized:
            return self.base_layer.compute_dtype
        return self.base_layer.weight.dtype

    def _unmerged_bias(self) -> Optional[torch.Tensor]:
        bias = self.bias
        if bias is None:
            return None
        if self._original_quant is not None:
            bias = self._original_quant[0].bias
        elif self._original_bias is not None:
            return self._original_bias.to(bias.device)
        return bias

    def add(self, name: str, config: AdamssConfig, key: str, from_file: bool = False) -> None:
        """Decompose and cluster the base weight (from a file too: files never carry the clusters);
        with ``from_file`` the factors are placeholders the file's values replace."""
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.unmerged_weight()  # the weight the adapter was made for, even with others merged
        if weight.is_meta:
            raise ValueError("AdaMSS decomposes the base weight, but this layer's weight is on the meta device "
                             "(not loaded yet); add the adapter once the weights are loaded")
        dtype = self.compute_dtype()
        device = weight.device
        bias = self._unmerged_bias()
        parts = decompose(self.canonical(weight.detach()), None if bias is None else bias.detach(), config.r,
                          config.num_subspaces, config.random_seed, key)
        kept = stored_dtype(dtype)  # float32 factors on a half-precision base, as PEFT upcasts them
        A_list, B_list = [], []
        for rows in parts.rows:
            data = parts.left[rows, :config.r]
            if from_file:  # the file gives the values (and, with a dynamic rank, the ranks: prepare_load)
                rank = max(1, min(len(rows), config.subspace_rank))
                A = torch.zeros(rank, data.shape[1])
                B = torch.zeros(len(rows), rank)
            else:  # PEFT's order of draws on the global generator: rank, then A, then B
                rank = subspace_rank(data, config.subspace_rank, config.use_dynamic_rank, config.svd_threshold)
                A = start_factors(data, rank)
                if config.init_weights == "orthogonal":
                    B = torch.zeros(len(rows), rank, dtype=dtype, device=device)
                else:
                    B = torch.randn(len(rows), rank, dtype=dtype, device=device) * 0.01
            # rounded to the base's dtype first, as PEFT makes them, then kept in ``kept``
            A_list.append(nn.Parameter(A.to(device, dtype).to(kept)))
            B_list.append(nn.Parameter(B.to(device, dtype).to(kept)))
        self.adamss_A[name] = nn.ParameterList(A_list)
        self.adamss_B[name] = nn.ParameterList(B_list)
        self.adamss_newB[name] = parts.projection.to(device, dtype).to(kept).contiguous()  # as PEFT keeps it
        self.adamss_rows[name] = torch.argsort(parts.order).to(device)
        self.cluster_rows[name] = [len(rows) for rows in parts.rows]
        self.frozen[name] = set()
        self.scaling[name] = 1.0

    def fit_to_file(self, name: str, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Shape the factors as the file's (a dynamic rank may differ from a fresh draw); a file whose
        clusters have other sizes was made on another base weight, and is refused."""
        sizes = self.cluster_rows[name]
        count = sum(1 for k in tensors if k.startswith(prefix + "adamss_B."))
        if count and count != len(sizes):
            raise ValueError(f"{prefix.removeprefix(FILE_PREFIX)}: the file has {count} AdaMSS subspaces, but "
                             f"clustering this base weight gives {len(sizes)} (was it saved for another base?)")
        for i, rows in enumerate(sizes):
            A, B = tensors.get(f"{prefix}adamss_A.{i}"), tensors.get(f"{prefix}adamss_B.{i}")
            if B is None or A is None or B.dim() != 2 or A.dim() != 2:
                continue  # the loader names a missing or malformed key
            if B.shape[0] != rows:
                raise ValueError(f"{prefix.removeprefix(FILE_PREFIX)}adamss_B.{i} has {B.shape[0]} rows in the file, "
                                 f"but clustering this base weight puts {rows} rows in subspace {i} (was the "
                                 "adapter saved for another base weight?)")
            old_A, old_B = self.adamss_A[name][i], self.adamss_B[name][i]
            if tuple(A.shape) != tuple(old_A.shape) or tuple(B.shape) != tuple(old_B.shape):
                self.adamss_A[name][i] = nn.Parameter(old_A.new_zeros(A.shape), requires_grad=old_A.requires_grad)
                self.adamss_B[name][i] = nn.Parameter(old_B.new_zeros(B.shape), requires_grad=old_B.requires_grad)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, (A, B) in enumerate(zip(self.adamss_A[name], self.adamss_B[name])):
            out[f"adamss_A.{i}"], out[f"adamss_B.{i}"] = A, B
        out["adamss_newB"] = self.adamss_newB[name]
        return out

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype()
        x = x.to(dtype)
        if self.bias is not None:  # the decomposed weight's last column is the bias
            x = torch.cat((x, x.new_ones(*x.shape[:-1], 1)), dim=-1)
        projected = F.linear(x, self.adamss_newB[name].to(dtype))
        frozen = self.frozen[name]
        chunks = []
        for i, (A, B) in enumerate(zip(self.adamss_A[name], self.adamss_B[name])):
            if i in frozen:  # ASA froze it: no gradient, so the optimizer leaves it as it is
                A, B = A.detach(), B.detach()
            chunks.append(F.linear(F.linear(projected, A.to(dtype)), B.to(dtype)))
        delta = torch.cat(chunks, dim=-1).index_select(-1, self.adamss_rows[name])
        return result + delta

    def delta_full(self, name: str) -> torch.Tensor:
        """``ΔW`` (out, in [+1]) in float32, PEFT's order of products."""
        projection = self.adamss_newB[name].float()
        stacked = torch.cat([B.detach().float() @ A.detach().float() @ projection
                             for A, B in zip(self.adamss_A[name], self.adamss_B[name])], dim=0)
        return stacked.index_select(0, self.adamss_rows[name])

    def merge_step(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   original_weight: torch.Tensor, original_bias: Optional[torch.Tensor],
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        full = self.delta_full(name).to(weight.device)
        in_features = self.in_out[0]
        weight = self.canonical(self.canonical(weight) + full[:, :in_features])
        if bias is not None:
            bias = bias + full[:, in_features]
        return weight, bias


class AdamssMethod(LayerMethod):
    """AdaMSS's layers, and ASA as the training loop's ``after_step`` hook."""

    def __init__(self) -> None:
        super().__init__(AdamssLinear, self._make)
        self._allocators: "weakref.WeakKeyDictionary[nn.Module, dict[str, SubspaceAllocator]]" = \
            weakref.WeakKeyDictionary()

    @staticmethod
    def _make(module: nn.Module, config: AdamssConfig, key: str) -> AdamssLinear:
        # PEFT's AdaMSS wraps nn.Linear only (GPT-2's Conv1D is refused there too); a 4-bit base is
        # decomposed from its dequantized weight here
        check_plain_linear(module, "AdaMSS", "PEFT's AdaMSS supports nn.Linear only, so GPT-2's Conv1D is refused")
        return AdamssLinear(module)

    def remove(self, model: nn.Module, name: str) -> None:
        self._allocators.get(model, {}).pop(name, None)

    def prepare_load(self, model: nn.Module, name: str, config: AdamssConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        for key, layer in model.named_modules():
            if isinstance(layer, AdamssLinear) and layer.has_adapter(name):
                layer.fit_to_file(name, tensors, f"{FILE_PREFIX}{key}.")

    def allocator(self, model: nn.Module, name: str, config: AdamssConfig) -> SubspaceAllocator:
        """The ASA state of adapter ``name`` (made on first use)."""
        per_model = self._allocators.setdefault(model, {})
        if name not in per_model:
            layers = [(k, m) for k, m in adapter_layers(model) if isinstance(m, AdamssLinear) and m.has_adapter(name)]
            per_model[name] = SubspaceAllocator(layers, name, config)
        return per_model[name]

    def after_step(self, model: nn.Module, name: str, config: AdamssConfig, step: int) -> None:
        """ASA after optimizer step ``step`` (1-based), gradients still present. PEFT's
        ``AdamssAsaCallback`` passes Trainer's ``global_step`` before it counts the step just
        taken, so PEFT's step number is ``step - 1``."""
        if config.use_asa:
            self.allocator(model, name, config).update_and_allocate(step - 1)

    def training_state(self, model: nn.Module, name: str, config: AdamssConfig) -> dict:
        return self.allocator(model, name, config).state() if config.use_asa else {}

    def load_training_state(self, model: nn.Module, name: str, config: AdamssConfig, state: dict) -> None:
        if config.use_asa and state:
            self.allocator(model, name, config).load_state(state)


register_method("ADAMSS", AdamssMethod())
