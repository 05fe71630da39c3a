"""The training objectives ``deltatune train --objective`` picks: sft, dpo and orpo.

``sft`` is the next-token loss on completions (``loss.TrainingLoss``). The preference objectives
are plain functions of per-sequence log-probabilities, one pair per row: the sum of the
log-probabilities of a completion's tokens given its prompt (prompt tokens never count), for the
chosen and the rejected completion, and each completion's token count.

- DPO (Rafailov et al. 2023, "Direct Preference Optimization"): with the policy's sums ``pc``,
  ``pj`` and the reference's ``rc``, ``rj``, ``Δ = (pc - rc) - (pj - rj)`` and the loss per pair
  ``-(1 - ε)·logσ(βΔ) - ε·logσ(-βΔ)``, where ``ε`` (``label_smoothing``) is conservative DPO's
  share of pairs assumed flipped (0: the paper's loss). The implicit rewards are ``β(pc - rc)``
  and ``β(pj - rj)``.
- ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):
  the SFT loss on the chosen completion (mean over its tokens) plus ``λ`` times
  ``-logσ(log odds(chosen) - log odds(rejected))``, where ``odds(y) = P(y) / (1 - P(y))`` and
  ``P(y)`` is the per-token mean probability ``exp(mean log p)``. No reference model. The rewards
  (logged, as TRL logs them) are ``λ·mean log p``.

Losses are means over the pairs of a micro-batch (ORPO's SFT term: over the chosen tokens), as
TRL computes them; ``tests/unit/test_objectives.py`` compares losses and gradients with TRL's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

OBJECTIVES = ("sft", "dpo", "orpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo")


@dataclass
class PairLogps:
    """Per-pair completion log-probabilities (sums over tokens) and token counts, shape ``(pairs,)``."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def from_rows(cls, sums: torch.Tensor, tokens: torch.Tensor) -> "PairLogps":
        """From ``2·pairs`` rows: the chosen rows first, then the rejected ones (one batch of both)."""
        chosen, rejected = sums.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        return cls(chosen, rejected, chosen_tokens, rejected_tokens)


@dataclass
class ObjectiveResult:
    """A micro-batch's loss and, per pair (detached), what the run logs."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars: ORPO's nll and log odds

    def metrics(self) -> dict[str, float]:
        """Means over the pairs: reward accuracy (chosen reward above rejected), margin, rewards, log-probs."""
        c, r = self.chosen_rewards.float(), self.rejected_rewards.float()
        out = {"reward_accuracy": (c > r).float().mean().item(), "reward_margin": (c - r).mean().item(),
               "chosen_reward": c.mean().item(), "rejected_reward": r.mean().item(),
               "chosen_logps": self.chosen_logps.float().mean().item(),
               "rejected_logps": self.rejected_logps.float().mean().item()}
        out.update({k: v.float().item() for k, v in self.extra.items()})
        return out


def dpo_loss(policy: PairLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> ObjectiveResult:
    """DPO's sigmoid loss (conservative DPO with ``label_smoothing`` > 0), mean over the pairs."""
    chosen_ratio = policy.chosen.float() - ref_chosen.float()
    rejected_ratio = policy.rejected.float() - ref_rejected.float()
    logits = beta * (chosen_ratio - rejected_ratio)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:  # the ε·logσ(-βΔ) term pulls back pairs the policy is already sure of
        per_pair = per_pair - label_smoothing * F.logsigmoid(-logits)
    return ObjectiveResult(per_pair.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach(),
                           policy.chosen.detach(), policy.rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` without cancellation: ``log(-expm1(x))`` near 0, where
    ``1 - exp(x)`` loses its digits, and ``log1p(-exp(x))`` below ``-log 2`` (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy: PairLogps, weight: float) -> ObjectiveResult:
    """ORPO: the chosen completions' mean token NLL plus ``weight`` (λ) times the odds-ratio loss."""
    chosen_tokens = policy.chosen_tokens.to(policy.chosen.dtype)
    nll = -policy.chosen.sum() / chosen_tokens.sum()  # token-weighted over the micro-batch, as an SFT loss
    chosen_mean = policy.chosen.float() / chosen_tokens.float()
    rejected_mean = policy.rejected.float() / policy.rejected_tokens.float()
    # log odds(y) = log P - log(1 - P), P = exp(mean log p): the per-token mean, so lengths do not decide
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    odds_term = -F.logsigmoid(log_odds)
    loss = nll + weight * odds_term.mean()
    return ObjectiveResult(loss, weight * chosen_mean.detach(), weight * rejected_mean.detach(),
                           policy.chosen.detach(), policy.rejected.detach(),
                           {"nll": nll.detach(), "log_odds_ratio": log_odds.detach().mean()})


def objective_loss(objective: str, policy: PairLogps, reference: torch.Tensor | None, beta: float,
                   label_smoothing: float, orpo_lambda: float) -> ObjectiveResult:
    """The loss of ``objective`` (dpo or orpo); ``reference``: ``(pairs, 2)`` reference sums (DPO)."""
    if objective == "dpo":
        if reference is None:
            raise ValueError("DPO needs the reference model's log-probabilities")
        return dpo_loss(policy, reference[:, 0], reference[:, 1], beta, label_smoothing)
    if objective == "orpo":
        return orpo_loss(policy, orpo_lambda)
    raise ValueError(f"objective {objective!r} is not a preference objective; use one of {PREFERENCE_OBJECTIVES}")
