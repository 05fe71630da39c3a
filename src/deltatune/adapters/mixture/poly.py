"""Poly (Polytropon) and Multi-Head Routing: LoRA skills mixed per task, per row.

Each targeted linear layer holds ``n_skills`` LoRA pairs of rank ``r``, cut into ``n_splits``
heads along the input (``A``) and output (``B``) features: ``poly_lora_A`` (n_splits, n_skills,
in/n_splits, r), ``poly_lora_B`` (n_splits, n_skills, r, out/n_splits). A row of task ``t`` mixes
the skills with its router's weights ``w[t]`` (n_splits, n_skills) head by head into one
``A_t`` (in, r) and ``B_t`` (r, out) and adds ``x A_t B_t / r``. The task of each row comes from
``task_ids`` (``deltatune.adapters.task_ids``). Files hold ``poly_lora_A``, ``poly_lora_B`` and
``poly_router.module_logits`` per layer, as PEFT saves them.

Not mergeable: rows of different tasks need different weights (and training samples the
mixture). Per-row adapter routing works (each routed group keeps its rows' task ids); a 4-bit
base works too, as the update never reads the base weight.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ...config import AdapterConfig
from ...config.mixture import PolyConfig
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import LayerMethod, register_method
from ..task_ids import TaskIds, release_task_ids, task_ids_of
from .poly_router import PolyRouter


class PolyLinear(LinearAdapterLayer):
    adapter_dict_names = ("poly_lora_A", "poly_lora_B", "poly_router")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.poly_lora_A = nn.ParameterDict()
        self.poly_lora_B = nn.ParameterDict()
        self.poly_router = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.n_tasks: dict[str, int] = {}
        self.tasks: Optional[TaskIds] = None  # the model's task ids; set by PolyMethod.inject

    @property
    def task_routed(self) -> bool:
        return bool(self.r)

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.r.pop(name, None)
        self.n_tasks.pop(name, None)

    def add(self, name: str, config: PolyConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        splits, skills, r = config.n_splits, config.n_skills, config.r
        for what, size in (("in", in_features), ("out", out_features)):
            if size % splits:
                raise ValueError(f"PolyConfig.n_splits={splits} must divide the layer's {what} features ({size})")
        A = torch.empty(splits, skills, in_features // splits, r)
        B = torch.zeros(splits, skills, r, out_features // splits)
        # each (head, skill) factor is drawn as nn.Linear draws its weight, PEFT's order of draws
        for skill in range(skills):
            for split in range(splits):
                A[split, skill] = nn.init.kaiming_uniform_(torch.empty(r, in_features // splits), a=math.sqrt(5)).T
        if not config.init_weights:
            for skill in range(skills):
                for split in range(splits):
                    B[split, skill] = nn.init.kaiming_uniform_(torch.empty(out_features // splits, r),
                                                               a=math.sqrt(5)).T
        router = PolyRouter(config)
        router.reset()
        self.poly_lora_A[name] = nn.Parameter(A)
        self.poly_lora_B[name] = nn.Parameter(B)
        self.poly_router[name] = router
        self.r[name] = r
        self.n_tasks[name] = config.n_tasks
        self.scaling[name] = 1.0 / r
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"poly_lora_A": self.poly_lora_A[name], "poly_lora_B": self.poly_lora_B[name],
                "poly_router.module_logits": self.poly_router[name].module_logits}

    def update(self, name: str, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """The adapter's output ``x A_t B_t / r`` for rows of tasks ``task_ids`` (x: rows first)."""
        A, B = self.poly_lora_A[name], self.poly_lora_B[name]
        weights = self.poly_router[name](task_ids).to(A.dtype)  # (rows, n_splits, n_skills)
        rows, r = weights.shape[0], self.r[name]
        in_features, out_features = self.in_out
        mixed_A = torch.einsum("bqs,qsdr->bqdr", weights, A).reshape(rows, in_features, r)
        mixed_B = torch.einsum("bqs,qsrd->bqrd", weights, B).transpose(1, 2).reshape(rows, r, out_features)
        flat = x.to(A.dtype).reshape(rows, -1, in_features)  # any middle dimensions (sequence) as one
        out = flat.bmm(mixed_A).bmm(mixed_B) / r
        return out.reshape(*x.shape[:-1], out_features)

    def _task_ids(self, name: str, batch: int, device: torch.device) -> torch.Tensor:
        if self.tasks is None:
            raise RuntimeError("this Poly layer was not added through dt.add_adapter (it has no task ids)")
        return self.tasks.for_batch(batch, device, f"Poly adapter {name!r}", self.n_tasks[name])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        out_dtype = result.dtype
        names = [n for n in self.active_adapters if self.has_adapter(n)]
        if self.row_plan is not None:
            names = [n for n, _ in self.row_plan.groups(x.shape[0], x.device) if self.has_adapter(n)]
        if not names:
            return result
        ids = None
        for name in names:  # every adapter of the model shares the call's task ids
            ids = self._task_ids(name, x.shape[0], x.device)
        if self.row_plan is None:
            for name in names:
                result = result + self.update(name, x, ids).to(out_dtype)
            return result
        for name, rows in self.row_plan.groups(x.shape[0], x.device):
            if self.has_adapter(name):
                routed = result.index_select(0, rows) + self.update(
                    name, x.index_select(0, rows), ids.index_select(0, rows)).to(out_dtype)
                result = result.index_copy(0, rows, routed)
        return result

    def merge_problem(self, name: str) -> Optional[str]:
        return "Poly mixes its skills per task from each row's task_ids, so rows of different tasks need " \
               "different weights (and training samples the mixture)"


class PolyMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(PolyLinear, self._make)

    @staticmethod
    def _make(module: nn.Module, config: PolyConfig, key: str) -> PolyLinear:
        check_linear_like(module, "Poly")
        return PolyLinear(module)

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        super().prepare(model, config)
        # PEFT hands task_ids to the layers only through its task-specific wrappers (PeftModel alone
        # drops them), so a file must name a task type for PEFT to route it
        seq2seq = getattr(model.config, "is_encoder_decoder", False)
        config.task_type = config.task_type or ("SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        tasks = task_ids_of(model)
        try:
            super().inject(model, config, name, from_file)
        finally:
            for module in model.modules():
                if isinstance(module, PolyLinear):
                    module.tasks = tasks
            release_task_ids(model)  # nothing injected (an error): no hooks left behind

    def remove(self, model: nn.Module, name: str) -> None:
        release_task_ids(model)


register_method("POLY", PolyMethod())
