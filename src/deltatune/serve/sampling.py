"""The next token of each row: greedy, or sampled with temperature and nucleus (top-p), each row
with its own settings and its own seeded generator, plus the log-probabilities OpenAI's API returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Sampling:
    """How one sequence picks its tokens (OpenAI's fields of the same names)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Choice:
    """One row's pick: the token, and its log-probability and the top alternatives when asked for."""

    token: int
    logprob: Optional[float] = None
    top: list[tuple[int, float]] = field(default_factory=list)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with everything outside the smallest set whose mass reaches ``top_p`` set to zero."""
    if top_p >= 1.0:
        return probs
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the tokens ranked above each one
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, ordered)


def pick(logits: torch.Tensor, settings: list[Sampling], generators: list[Optional[torch.Generator]]) -> list[Choice]:
    """One ``Choice`` per row of ``logits`` (rows, vocabulary), in float32."""
    logits = logits.float()
    choices = []
    greedy = logits.argmax(-1).tolist()
    wants_logprobs = any(s.logprobs for s in settings)
    logprobs = torch.log_softmax(logits, -1) if wants_logprobs else None
    for row, s in enumerate(settings):
        token = greedy[row]
        if not s.greedy:
            probs = nucleus(torch.softmax(logits[row] / s.temperature, -1), s.top_p)
            token = int(torch.multinomial(probs, 1, generator=generators[row]).item())
        choice = Choice(token)
        if s.logprobs and logprobs is not None:
            choice.logprob = float(logprobs[row, token])
            if s.top_logprobs:
                values, ids = logprobs[row].topk(s.top_logprobs)
                choice.top = list(zip(ids.tolist(), values.tolist()))
        choices.append(choice)
    return choices


def generator_for(seed: Optional[int]) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a fresh random seed when None): a request's samples
    depend only on its seed, not on which other requests share its batch."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
