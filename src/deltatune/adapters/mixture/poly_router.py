"""Poly's router: which mixture of skills each task uses, per head (PEFT's ``PolyRouter``).

``module_logits`` holds one logit per (task, head × skill). A row's mixture is their sigmoid in
eval mode, or a relaxed-Bernoulli sample (temperature 1) in training, divided by its sum over
skills so that each head's weights add to one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ...config.mixture import PolyConfig

EPS = 1e-12  # keeps the division finite when every weight underflows


class PolyRouter(nn.Module):
    def __init__(self, config: PolyConfig):
        super().__init__()
        self.n_splits, self.n_skills = config.n_splits, config.n_skills
        self.module_logits = nn.Parameter(torch.empty(config.n_tasks, config.n_splits * config.n_skills))

    def reset(self) -> None:
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Mixing weights (rows, n_splits, n_skills) for one task index per row."""
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        logits = logits.view(-1, self.n_splits, self.n_skills)
        if self.training:  # a differentiable sample, so the routing is learned with the skills
            weights = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            weights = torch.sigmoid(logits)
        return weights / (weights.sum(dim=-1, keepdim=True) + EPS)
