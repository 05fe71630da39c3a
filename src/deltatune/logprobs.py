"""Per-sequence log-probabilities of completions: what preference objectives compare.

For each row of a batch, the sum over its labelled positions of ``log p(token | everything before
it)``, and the count of those positions (labels -100 mark the prompt and the padding). Where the
model allows the labelled-positions loss (``loss.TrainingLoss``), only the labelled positions are
projected onto the vocabulary, through the fused ``kernels.linear_cross_entropy`` (the
``tokens × vocabulary`` logits never exist): a row's sum is minus its mean cross-entropy times its
token count, one call per row. Other models (soft prompts, classes not checked for that path) run
their own forward and take the log-softmax at the labelled positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import linear_cross_entropy
from .loss import IGNORE_INDEX, TrainingLoss


def completion_logps(loss_of: TrainingLoss, batch: dict[str, torch.Tensor],
                     cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)``, each ``(rows,)``: float32 sums of the labelled tokens' log-probabilities
    and their counts. Differentiable where gradients are enabled; every row needs a labelled token.
    ``cache``: a key/value cache of tokens that precede every row (``TrainingLoss.hidden_states``;
    the labelled-positions path only)."""
    labels = batch["labels"]
    # position t predicts token t + 1; the last position predicts nothing
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    counts = keep.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("a row has no labelled token: its completion log-probability is undefined")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if cache is not None and loss_of.reason is not None:
        raise ValueError(f"a cached prefix needs the labelled-positions path, and {loss_of.reason}")
    if loss_of.reason is None:
        hidden = loss_of.hidden_states(inputs, cache)
        head = loss_of.model.get_output_embeddings()
        if type(head) is nn.Linear:
            rows = zip(hidden[keep].split(counts.tolist()), targets[keep].split(counts.tolist()))
            sums = torch.stack([-linear_cross_entropy(h, head.weight, head.bias, t) * len(t) for h, t in rows])
            return sums, counts
        logits = head(hidden[keep])
    else:
        logits = loss_of.model(**inputs, use_cache=False).logits
        # soft prompts put virtual tokens in front: the last positions are the rows' own
        logits = logits[:, -labels.shape[1]:][keep]
    token_logps = logits.float().log_softmax(-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    row_of = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(keep)[keep]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, row_of, token_logps)
    return sums, counts
