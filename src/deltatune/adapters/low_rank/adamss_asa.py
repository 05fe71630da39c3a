"""AdaMSS's Adaptive Subspace Allocation (ASA): PEFT's ``update_and_allocate`` schedule.

From step ``init_warmup`` to ``final_warmup`` (PEFT's 0-based step numbers, both ends included)
each step averages every trained factor's importance ``|p · ∇p|`` and its uncertainty
``|importance − average|`` (the uncertainty first, from the average before this step). On every
``mask_interval``-th step in that window, the subspaces are scored (the mean of importance ×
uncertainty over ``A_k``, plus the same over ``B_k``) and ranked across all layers: those not
strictly above the ``target``-th best score are frozen, ``target`` falling from the total number of
subspaces to ``asa_target_subspaces`` as ``(1 − progress) ** asa_schedule_exponent``; then the
averages restart. A frozen subspace keeps its values and still adds its update, but gets no
gradient (PEFT turns off its ``requires_grad``; here the layer detaches it, which leaves its
gradient empty, so optimizers skip it the same way, while the set of trained tensors, which
checkpoints and distributed wrappers rely on, stays fixed). A frozen subspace has no gradient to
score, so it stays frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...config.adamss import AdamssConfig

_KINDS = ("ipt_A", "ipt_B", "unc_A", "unc_B")


class SubspaceAllocator:
    """The importance averages and the schedule of one AdaMSS adapter over its layers."""

    def __init__(self, layers: list[tuple[str, nn.Module]], name: str, config: AdamssConfig):
        """``layers``: (module name, AdaMSS layer) pairs holding adapter ``name``; each layer has
        ``adamss_A``/``adamss_B`` (name -> list of factors) and ``frozen`` (name -> set of indices)."""
        self.layers, self.name, self.config = layers, name, config
        self.total = sum(len(layer.adamss_A[name]) for _, layer in layers)
        self.averages: dict[str, dict[str, list[Optional[torch.Tensor]]]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the averages (after each masking, so early steps do not dominate later ones)."""
        self.averages = {key: {kind: [None] * len(layer.adamss_A[self.name]) for kind in _KINDS}
                         for key, layer in self.layers}

    def target(self, step: int) -> Optional[int]:
        """How many subspaces stay trained after masking at ``step``."""
        c = self.config
        if self.total == 0 or step < c.init_warmup:
            return None
        if step > c.final_warmup:
            return c.asa_target_subspaces
        remaining = 1.0 - (step - c.init_warmup) / (c.final_warmup - c.init_warmup)
        remaining = max(0.0, min(1.0, remaining))
        return int(c.asa_target_subspaces + (self.total - c.asa_target_subspaces) * remaining ** c.asa_schedule_exponent)

    def update_importance(self) -> None:
        c = self.config
        with torch.no_grad():
            for key, layer in self.layers:
                table = self.averages[key]
                for part in ("A", "B"):
                    params = getattr(layer, f"adamss_{part}")[self.name]
                    ipt_list, unc_list = table[f"ipt_{part}"], table[f"unc_{part}"]
                    for i, p in enumerate(params):
                        if p.grad is None:
                            continue
                        if ipt_list[i] is None:
                            ipt_list[i], unc_list[i] = torch.zeros_like(p), torch.zeros_like(p)
                        ipt = (p * p.grad).abs()
                        unc_list[i].mul_(c.asa_uncertainty_beta).add_((ipt - ipt_list[i]).abs(),
                                                                      alpha=1 - c.asa_uncertainty_beta)
                        ipt_list[i].mul_(c.asa_importance_beta).add_(ipt, alpha=1 - c.asa_importance_beta)

    def mask_to(self, target: int) -> None:
        """Freeze every scored subspace not strictly above the ``target``-th best score."""
        scored = []
        for key, layer in self.layers:
            t = self.averages[key]
            for i in range(len(layer.adamss_A[self.name])):
                if t["ipt_A"][i] is None or t["ipt_B"][i] is None:
                    continue
                score = (t["ipt_A"][i] * t["unc_A"][i]).mean() + (t["ipt_B"][i] * t["unc_B"][i]).mean()
                scored.append((layer, i, score))
        if not scored:
            return
        if target >= len(scored):
            threshold = float("-inf")
        else:
            scores = torch.stack([s.to(scored[0][2].device) for _, _, s in scored])
            threshold = -torch.kthvalue(-scores, target)[0].item()
        for layer, i, score in scored:
            if float(score) > threshold:
                layer.frozen[self.name].discard(i)
            else:
                layer.frozen[self.name].add(i)
                for part in ("adamss_A", "adamss_B"):
                    getattr(layer, part)[self.name][i].grad = None

    def update_and_allocate(self, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: after the optimizer step, before gradients are cleared."""
        c = self.config
        if not c.init_warmup <= step <= c.final_warmup:
            return
        self.update_importance()
        if step % c.mask_interval == 0:
            target = self.target(step)
            if target is not None:
                self.mask_to(target)
            self.reset()

    def state(self) -> dict:
        """Frozen subspaces and averages, for a resumed run."""
        return {"frozen": {key: sorted(layer.frozen[self.name]) for key, layer in self.layers},
                "averages": self.averages}

    def load_state(self, state: dict) -> None:
        for key, layer in self.layers:
            layer.frozen[self.name] = set(state.get("frozen", {}).get(key, []))
            saved = state.get("averages", {}).get(key)
            if saved:
                device = layer.adamss_A[self.name][0].device
                self.averages[key] = {kind: [None if v is None else v.to(device) for v in saved[kind]]
                                      for kind in _KINDS}
