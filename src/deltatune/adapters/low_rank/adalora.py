"""AdaLoRA: LoRA in SVD form with a rank budget that training re-allocates between layers.

Each layer holds ``P = lora_B`` (out, r), ``Λ = lora_E`` (r, 1) and ``Q = lora_A`` (r, in);
the update is ``P · diag(Λ) · Q · alpha / (ranknum + 1e-5)`` with ``ranknum = init_r`` (PEFT's
scale, kept after ranks shrink). ``RankAllocator`` scores each triplet (Pᵢ, Λᵢ, Qᵢ) by the
smoothed sensitivity ``|w · ∂L/∂w|`` times its uncertainty, and zeroes the lowest Λᵢ until
the total rank fits a budget that falls cubically from ``init_r`` to ``target_r`` per layer.
The final masks are saved as ``rank_pattern`` (``<module>.lora_E`` -> list of bools) and the
file holds only the kept triplets, as PEFT writes them.
"""

from __future__ import annotations

import weakref
from typing import Iterator, Optional

import torch
from torch import nn

from ...config import AdaLoraConfig
from ..base import adapter_layers
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import FILE_PREFIX, LayerMethod, register_method

_EPS = 1e-5


class AdaLoraLinear(LinearAdapterLayer):
    adapter_dict_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.ranknum: dict[str, float] = {}
        self.rank_mask: dict[str, Optional[list[bool]]] = {}  # the saved pattern this layer was built from

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.ranknum.pop(name, None)
        self.rank_mask.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def add(self, name: str, config: AdaLoraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        mask = (config.rank_pattern or {}).get(f"{key}.lora_E")
        r = sum(bool(m) for m in mask) if mask is not None else config.init_r
        in_features, out_features = self.in_out
        self.lora_A[name] = nn.Parameter(torch.randn(r, in_features))
        self.lora_E[name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[name] = nn.Parameter(torch.randn(out_features, r))
        if config.init_lora_weights and not from_file:
            nn.init.zeros_(self.lora_E[name])
            nn.init.normal_(self.lora_A[name], std=0.02)
            nn.init.normal_(self.lora_B[name], std=0.02)
        self.ranknum[name] = float(config.init_r)
        self.rank_mask[name] = None if mask is None else [bool(m) for m in mask]
        self.scaling[name] = config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.match_device(name)

    def _scale(self, name: str) -> float:
        return self.scaling[name] / (self.ranknum[name] + _EPS)

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        x = self.lora_dropout[name](x.to(A.dtype))
        return result + (x @ (A * E).T @ B.T) * self._scale(name)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        A, B, E = (t.detach().float() for t in (self.lora_A[name], self.lora_B[name], self.lora_E[name]))
        delta = B @ (A * E) * self._scale(name)
        return self.canonical(self.canonical(weight) + delta.to(weight.device))

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name], "lora_E": self.lora_E[name]}


class RankAllocator:
    """The budget schedule and importance scores of one AdaLoRA adapter (PEFT's algorithm)."""

    def __init__(self, layers: list[tuple[str, AdaLoraLinear]], name: str, config: AdaLoraConfig):
        self.layers, self.name, self.config = layers, name, config
        self.init_budget = sum(layer.lora_A[name].shape[0] for _, layer in layers)
        self.target_budget = config.target_r * len(layers)
        self.exp_avg_ipt: dict[int, torch.Tensor] = {}
        self.exp_avg_unc: dict[int, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        fraction = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * fraction ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def _params(self, layer: AdaLoraLinear) -> Iterator[nn.Parameter]:
        return (getattr(layer, attr)[self.name] for attr in ("lora_A", "lora_B", "lora_E"))

    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for _, layer in self.layers:
                for p in self._params(layer):
                    if p.grad is None:
                        continue
                    ipt = (p * p.grad).abs()
                    key = id(p)
                    avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                    unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                    avg = b1 * avg + (1 - b1) * ipt
                    self.exp_avg_ipt[key] = avg
                    self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, p: nn.Parameter) -> torch.Tensor:
        key = id(p)
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(p)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the least important triplets so that ``budget`` remain; return the masks."""
        scores = []
        for _, layer in self.layers:
            A, B, E = self._params(layer)
            triplet = (self._score(E).view(-1) + self._score(A).mean(dim=1) + self._score(B).mean(dim=0))
            scores.append(triplet)
        k = self.init_budget - budget
        if k <= 0:
            return {f"{key}.lora_E": [True] * len(s) for (key, _), s in zip(self.layers, scores)}
        threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores]), k=k)[0].item()
        pattern = {}
        with torch.no_grad():
            for (key, layer), s in zip(self.layers, scores):
                keep = s > threshold
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)
                pattern[f"{key}.lora_E"] = keep.tolist()
        return pattern

    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        with torch.no_grad():
            for key, layer in self.layers:
                keep = torch.tensor(pattern[f"{key}.lora_E"], device=layer.lora_E[self.name].device)
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)


class AdaLoraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(AdaLoraLinear, self._make, bias_only="lora_only")
        self._allocators: "weakref.WeakKeyDictionary[nn.Module, dict[str, RankAllocator]]" = weakref.WeakKeyDictionary()

    @staticmethod
    def _make(module: nn.Module, config: AdaLoraConfig, key: str) -> AdaLoraLinear:
        check_linear_like(module, "AdaLoRA")
        return AdaLoraLinear(module, config.fan_in_fan_out)

    def remove(self, model: nn.Module, name: str) -> None:
        self._allocators.get(model, {}).pop(name, None)

    def file_tensors(self, model: nn.Module, name: str, config: AdaLoraConfig) -> dict[str, torch.Tensor]:
        """Live tensors, or the kept triplets only when training has masked ranks (as PEFT saves)."""
        out = super().file_tensors(model, name, config)
        pattern = config.rank_pattern or {}
        for key, layer in adapter_layers(model):
            mask = pattern.get(f"{key}.lora_E")
            if not isinstance(layer, AdaLoraLinear) or mask is None or not layer.has_adapter(name):
                continue
            if layer.lora_A[name].shape[0] == sum(mask):
                continue  # built from this pattern: already the kept triplets
            keep = torch.tensor(mask, device=layer.lora_A[name].device)
            prefix = f"{FILE_PREFIX}{key}."
            out[prefix + "lora_A"] = layer.lora_A[name][keep]
            out[prefix + "lora_E"] = layer.lora_E[name][keep]
            out[prefix + "lora_B"] = layer.lora_B[name][:, keep]
        return out

    def _allocator(self, model: nn.Module, name: str, config: AdaLoraConfig) -> RankAllocator:
        per_model = self._allocators.setdefault(model, {})
        if name not in per_model:
            layers = [(k, m) for k, m in adapter_layers(model) if isinstance(m, AdaLoraLinear) and m.has_adapter(name)]
            per_model[name] = RankAllocator(layers, name, config)
        return per_model[name]

    def loss_penalty(self, model: nn.Module, name: str, config: AdaLoraConfig) -> Optional[torch.Tensor]:
        """``orth_reg_weight`` × the mean of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F over layers."""
        if not config.orth_reg_weight:
            return None
        terms = []
        for _, layer in adapter_layers(model):
            if isinstance(layer, AdaLoraLinear) and layer.has_adapter(name):
                A, B = layer.lora_A[name], layer.lora_B[name]
                for cov in (A @ A.T, B.T @ B):
                    terms.append(torch.linalg.norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
        return config.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def training_state(self, model: nn.Module, name: str, config: AdaLoraConfig) -> dict:
        allocator = self._allocator(model, name, config)
        params = [p for _, layer in allocator.layers for p in allocator._params(layer)]
        return {"rank_pattern": config.rank_pattern,
                "exp_avg_ipt": [allocator.exp_avg_ipt.get(id(p)) for p in params],
                "exp_avg_unc": [allocator.exp_avg_unc.get(id(p)) for p in params]}

    def load_training_state(self, model: nn.Module, name: str, config: AdaLoraConfig, state: dict) -> None:
        allocator = self._allocator(model, name, config)
        params = [p for _, layer in allocator.layers for p in allocator._params(layer)]
        config.rank_pattern = state.get("rank_pattern")
        for table, saved in ((allocator.exp_avg_ipt, state.get("exp_avg_ipt", [])),
                             (allocator.exp_avg_unc, state.get("exp_avg_unc", []))):
            table.clear()
            for p, value in zip(params, saved):
                if value is not None:
                    table[id(p)] = value.to(p.device)

    def after_step(self, model: nn.Module, name: str, config: AdaLoraConfig, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``; call after ``optimizer.step()``, before ``zero_grad``."""
        if config.total_step is None:
            raise ValueError("AdaLoraConfig.total_step must be set to re-allocate ranks during training")
        allocator = self._allocator(model, name, config)
        end = config.total_step - config.tfinal
        if step < end:
            allocator.update_importance()
            budget, mask_now = allocator.budget(step)
            if mask_now:
                config.rank_pattern = allocator.mask_to_budget(budget)
        elif step == end:
            allocator.update_importance()
            config.rank_pattern = allocator.mask_to_budget(allocator.budget(step)[0])
            allocator.exp_avg_ipt.clear()
            allocator.exp_avg_unc.clear()
        elif config.rank_pattern:
            allocator.apply_pattern(config.rank_pattern)


register_method("ADALORA", AdaLoraMethod())
