"""Lily layers: low-rank adapters interconnected across layers through shared factors.

Each adapted layer holds ``lily_A`` (r × in), ``lily_B`` (num_B·r × out, the ``num_B`` output
factors stacked) and ``lily_router`` (num_B × r), as ``nn.Linear`` modules in PEFT's layout.
After every layer has its own, the layers of one adapter are grouped by the target suffix they
matched and their weight shape, in module order: every ``stride_A`` adjacent layers of a group
use the first one's ``A`` module, and all layers of a group use the first layer's ``B`` module
(the same module objects, so one tensor trains). Routers stay per layer.

Forward: ``h = A x``; the router's softmax over ``h`` is averaged over every token of the batch
into weights ``p`` (num_B); the update is ``scaling · h (Σ_e p_e B_e)``. Because of that batch
average, a row's output depends on the other rows: the update cannot be folded into the weights
and rows cannot be routed to different adapters.

Files hold every layer's ``lily_A``/``lily_B``/``lily_router``, shared ones repeated under each
layer that uses them (PEFT writes copies); a file that keeps only some copies loads too. PEFT
shares only for a model's first Lily adapter (its later ones are built unshared, so their
files hold differing copies); such a file loads unshared, as that adapter was trained.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ...config.low_rank import LilyConfig
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import FILE_PREFIX, LayerMethod, register_method

BATCH_DEPENDENT = ("its router averages the mixing weights of the shared B factors over every token of the "
                   "batch, so each row's update depends on the other rows")


class LilyLinear(LinearAdapterLayer):
    adapter_dict_names = ("lily_A", "lily_B", "lily_router")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lily_A = nn.ModuleDict()
        self.lily_B = nn.ModuleDict()
        self.lily_router = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.num_B: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.r.pop(name, None)
        self.num_B.pop(name, None)

    def add(self, name: str, config: LilyConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        r, num_B = config.r, config.num_B
        # built and drawn in PEFT's order (three Linear inits, then A, router, B), so one seed
        # gives PEFT's start; layers that later share a module still draw their own, as in PEFT
        A = nn.Linear(in_features, r, bias=False)
        B = nn.Linear(out_features, num_B * r, bias=False)
        router = nn.Linear(r, num_B, bias=False)
        if not from_file:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(router.weight, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(B.weight)  # no change at the start
            else:
                nn.init.kaiming_uniform_(B.weight, a=math.sqrt(5))
        self.lily_A[name], self.lily_B[name], self.lily_router[name] = A, B, router
        self.r[name], self.num_B[name] = r, num_B
        self.scaling[name] = float(config.scaling)
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{kind}.weight": getattr(self, kind)[name].weight for kind in self.adapter_dict_names}

    def merge_problem(self, name: str) -> Optional[str]:
        return BATCH_DEPENDENT

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self.row_plan
        if plan is not None and not self.disabled and any(n is not None and self.has_adapter(n) for n in plan.names):
            raise NotImplementedError(f"Lily adapters cannot be routed per row: {BATCH_DEPENDENT}")
        return super().forward(x, *args, **kwargs)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A = self.lily_A[name].weight
        num_B = self.num_B[name]
        stacked = self.lily_B[name].weight  # (num_B·r, out): factor e is rows e·r … (e+1)·r
        B = stacked.reshape(num_B, -1, stacked.shape[1])
        hidden = nn.functional.linear(x.to(A.dtype), A)
        probabilities = torch.softmax(nn.functional.linear(hidden, self.lily_router[name].weight), dim=-1)
        weights = probabilities.reshape(-1, num_B).mean(dim=0)  # one weight per factor for the whole batch
        combined = torch.einsum("e,eio->io", weights, B)
        delta = torch.matmul(hidden, combined)
        return result + (delta * self.scaling[name]).to(result.dtype)


def _matched_suffix(key: str, targets: Union[list[str], str, None]) -> Optional[str]:
    """The target entry a layer is grouped under: a regular expression groups every layer under
    itself; from a list, the longest entry the name ends with (a plain string suffix, as PEFT
    tests it; where several entries match, PEFT takes whichever its set yields last)."""
    if isinstance(targets, str):
        return targets
    matches = [t for t in targets or [] if key.endswith(t)]
    return max(matches, key=len) if matches else None


def share_across_layers(model: nn.Module, name: str, config: LilyConfig) -> None:
    """Point adapter ``name``'s layers at their group's shared ``A`` and ``B`` modules."""
    groups: dict[tuple[str, tuple[int, int]], list[LilyLinear]] = {}
    for key, layer in model.named_modules():
        if not (isinstance(layer, LilyLinear) and layer.has_adapter(name)):
            continue
        suffix = _matched_suffix(key, config.target_modules)
        if suffix is None:  # not reached for targeted layers; such a layer keeps its own factors
            continue
        in_features, out_features = layer.in_out
        groups.setdefault((suffix, (out_features, in_features)), []).append(layer)
    for layers in groups.values():
        shared_B = layers[0].lily_B[name]
        for i, layer in enumerate(layers):
            if i:
                layer.lily_B[name] = shared_B
            leader = (i // config.stride_A) * config.stride_A
            if i != leader:
                layer.lily_A[name] = layers[leader].lily_A[name]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal copies: same shape, dtype and values (a damaged file may mix dtypes torch cannot compare)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


class LilyMethod(LayerMethod):
    rows_independent = False  # the router's average over the batch

    def __init__(self) -> None:
        super().__init__(LilyLinear, self._make)

    @staticmethod
    def _make(module: nn.Module, config: LilyConfig, key: str) -> LilyLinear:
        if type(module).__name__ == "Conv1D":
            raise TypeError("Lily cannot wrap GPT-2's Conv1D: PEFT's Lily wraps nn.Linear layers only, so such "
                            "an adapter's files would not load there")
        check_linear_like(module, "Lily")
        return LilyLinear(module)

    def inject(self, model: nn.Module, config: LilyConfig, name: str, from_file: bool) -> None:
        super().inject(model, config, name, from_file)
        share_across_layers(model, name, config)

    def prepare_load(self, model: nn.Module, name: str, config: LilyConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        """Match a file's copies of each shared tensor. Equal copies (PEFT's first adapter,
        deltatune) fill the one tensor, and a file holding only some copies loads too. Copies
        that differ come from a model's second or later Lily adapter in PEFT, which PEFT builds
        without sharing: those layers get their own tensors, so the adapter is the one trained."""
        aliases: dict[int, list[tuple[str, LilyLinear, str]]] = {}
        for key, layer in model.named_modules():
            if isinstance(layer, LilyLinear) and layer.has_adapter(name):
                for kind in layer.adapter_dict_names:
                    aliases.setdefault(id(getattr(layer, kind)[name]), []).append(
                        (f"{FILE_PREFIX}{key}.{kind}.weight", layer, kind))
        for users in aliases.values():
            present = [k for k, _, _ in users if k in tensors]
            if len(users) < 2 or not present:
                continue  # an unshared tensor, or one the file lacks (the missing-key check names it)
            value = tensors[present[-1]]
            if all(_same(tensors[k], value) for k in present):
                for k, _, _ in users:
                    tensors[k] = value
                continue
            warnings.warn(f"the file holds different values for {len(present)} copies of one shared Lily tensor "
                          f"({present[0]!r}, ...): PEFT writes such files for a model's second and later Lily "
                          "adapters, which it builds without sharing; those layers load their own copies",
                          stacklevel=2)
            for _, layer, kind in users[1:]:
                holder = getattr(layer, kind)
                holder[name] = copy.deepcopy(holder[name])  # same shape, device and requires_grad


register_method("LILY", LilyMethod())
