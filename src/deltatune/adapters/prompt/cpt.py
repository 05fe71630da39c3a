"""Context-aware Prompt Tuning (CPT; Blau et al., arXiv:2410.17222), served as a soft prompt.

The prompt is a context of real tokens (``cpt_token_ids``): their embeddings (``context``, a
frozen float32 copy of the base's rows) plus a trained ``delta``, zero at the start. Three
things make it CPT rather than prompt tuning, each matching PEFT 0.21.2's ``CPTEmbedding`` and
``PeftModelForCausalLM`` on the same values:

- only template and input tokens change (types 1, 2, 3 modulo 4): ``delta`` is multiplied by that
  mask in the forward pass, which gives PEFT's masked gradient (PEFT masks it in a hook);
- after every optimizer step each token's change is pulled back onto a ball around its own
  embedding (``CPTEncoder.project_``, called through ``Method.after_step``); PEFT projects at
  the start of the next forward pass, which reads the same values;
- in training mode, with labels, the context's label tokens are targets too, and the loss weighs
  each example's label by its age (``weighted_loss``). The soft-prompt hook asks the encoder for
  the labels of the whole row (``prompt_labels``) and puts this loss on the model's output, as
  PEFT's forward does, so the training loop (and a user's own loop) minimises CPT's loss. In eval
  mode the loss is the input's own next-token loss, as for any soft prompt, so that validation
  loss and perplexity mean what they mean for every other method (PEFT applies CPT's loss in
  both modes).

Files hold ``prompt_embeddings``, the context as used (``context + delta``), as PEFT saves it.
A file read back is the new context with a zero delta, as PEFT loads it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig
from ...config.cpt import CPTConfig
from ..method import register_method
from .soft_prompts import FILE_KEY, PROMPTS_ATTR, PromptMethod, SoftPrompts

IGNORE = -100
MIN_EPSILON = 1e-10  # the ball of tokens that never change (labels, separators), as in PEFT
REFERENCE_DIM = 2048  # the radii are given for 2048-wide embeddings and scale with sqrt(dim / 2048)


def updatable(types: torch.Tensor) -> torch.Tensor:
    """Template and input tokens (types 1, 2, 3 modulo 4): the ones whose embeddings train."""
    rest = torch.remainder(types, 4)
    return (rest == 1) | (rest == 2) | (rest == 3)


def is_label(types: torch.Tensor) -> torch.Tensor:
    """Label tokens (positive multiples of 4): the targets of the loss."""
    return (types > 0) & (torch.remainder(types, 4) == 0)


def radii(config: CPTConfig, dim: int) -> torch.Tensor:
    """Each context token's ball radius, float32: the format radius for templates, the input
    radius for inputs, ``MIN_EPSILON`` for the rest; both scaled by ``sqrt(dim / 2048)``."""
    types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)
    scale = torch.sqrt(torch.tensor([dim / REFERENCE_DIM], dtype=torch.float32))
    rest = torch.remainder(types, 4)
    out = torch.full(types.shape, MIN_EPSILON, dtype=torch.float32)
    out[(types > 0) & ((rest == 1) | (rest == 3))] = config.opt_projection_format_epsilon * scale
    out[(types > 0) & (rest == 2)] = config.opt_projection_epsilon * scale
    return out


class CPTEncoder(nn.Module):
    """The context's embeddings (a buffer) and their trained change ``delta`` (the one parameter)."""

    def __init__(self, config: CPTConfig, dim: int):
        super().__init__()
        n = config.num_virtual_tokens
        types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)
        self.register_buffer("context", torch.zeros(n, dim))
        self.delta = nn.Parameter(torch.zeros(n, dim))
        self.register_buffer("types", types)
        self.register_buffer("trained_rows", updatable(types).float().unsqueeze(1))
        self.register_buffer("epsilon", radii(config, dim))
        self.register_buffer("token_ids", torch.tensor(config.cpt_token_ids, dtype=torch.long))
        self.decay = config.opt_loss_decay_factor if config.opt_weighted_loss_type == "decay" else 1.0

    def forward(self) -> torch.Tensor:
        return self.context + self.delta * self.trained_rows

    @torch.no_grad()
    def project_(self) -> None:
        """Pull each token's change back onto its ball: rows longer than their radius are scaled
        to it, shorter ones are kept (PEFT's projection, the same float32 operations)."""
        norms = torch.norm(self.delta, p=2, dim=1)
        scale = self.epsilon / norms.clamp(min=self.epsilon)
        self.delta.mul_(torch.where(norms > 0, scale, torch.ones_like(scale)).unsqueeze(1))

    def prompt_labels(self, labels: Optional[torch.Tensor], input_types: Optional[torch.Tensor]
                      ) -> tuple[Optional[torch.Tensor], Optional[Callable[[torch.Tensor], torch.Tensor]]]:
        """Labels for the context and the input together, and the loss to put on the output (a
        function of the full logits), or ``(None, None)`` without labels. ``input_types``: the
        input's own type mask (PEFT's ``input_type_mask``); none: every input token is a label of
        the newest example. The input's types follow the context's, as in PEFT. In eval mode: the
        input's labels only, behind ignored context positions, and the model's own loss."""
        if labels is None:
            return None, None
        batch = labels.shape[0]
        if not self.training:
            return torch.cat([labels.new_full((batch, self.token_ids.numel()), IGNORE), labels], dim=1), None
        if input_types is None:
            input_types = torch.full_like(labels, 4)
        input_types = input_types.to(labels.device).long()
        input_types = torch.where(input_types > 0, input_types + self.types.max().to(labels.device), input_types)
        types = torch.cat([self.types.to(labels.device).expand(batch, -1), input_types], dim=1)
        targets = torch.cat([self.token_ids.to(labels.device).expand(batch, -1), labels], dim=1)
        targets = torch.where(is_label(types), targets, torch.full_like(targets, IGNORE))
        decay = self.decay
        return targets, lambda logits: weighted_loss(logits, targets, types, decay)


def label_weights(types: torch.Tensor, decay: float) -> torch.Tensor:
    """(rows, positions) float32 weights: in each row, the newest label type (the largest value)
    weighs 1 and each older one ``decay`` times the next newer one; other positions weigh 1."""
    labelled = is_label(types)
    # label values -> dense ranks (so a huge type value costs nothing); non-labels share value 0
    _, rank = torch.unique(torch.where(labelled, types, torch.zeros_like(types)), return_inverse=True)
    count = int(rank.max().item()) + 1 if rank.numel() else 1
    present = torch.zeros(types.shape[0], count, dtype=torch.long, device=types.device)
    present = present.scatter_reduce(1, rank, labelled.long(), reduce="amax")  # this row has that label type
    # how many newer label types the row holds: the power of ``decay`` a label takes
    newer = present.flip(1).cumsum(1).flip(1) - present
    powers, value = [], 1.0  # by repeated multiplication in Python floats, as PEFT accumulates them
    for _ in range(count):
        powers.append(value)
        value *= decay
    table = torch.tensor(powers, dtype=torch.float64).to(torch.float32).to(types.device)
    weights = table[newer.gather(1, rank)]
    return torch.where(labelled, weights, torch.ones_like(weights))


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, decay: float) -> torch.Tensor:
    """CPT's loss: next-token cross-entropy at labelled positions, times ``label_weights``,
    averaged over those positions (PEFT's ``CPTEmbedding.calculate_loss``)."""
    logits, labels, types = logits[:, :-1], labels[:, 1:].to(logits.device), types[:, 1:].to(logits.device)
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view(labels.shape)
    keep = labels != IGNORE
    return (losses[keep] * label_weights(types, decay)[keep]).mean()


class CPTMethod(PromptMethod):
    """Soft-prompt serving with CPT's context, masked change, projection and loss."""

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        assert isinstance(config, CPTConfig)
        super().prepare(model, config)
        rows = model.get_input_embeddings().weight.shape[0]
        bad = [t for t in config.cpt_token_ids if t >= rows]
        if bad:
            raise ValueError(f"CPTConfig.cpt_token_ids: id {bad[0]} is outside the model's {rows} embedding rows")

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, CPTConfig)
        words = model.get_input_embeddings().weight
        encoder = CPTEncoder(config, config.token_dim)
        if not from_file:  # a file's prompt replaces the context
            ids = torch.tensor(config.cpt_token_ids, device=words.device)
            encoder.context.copy_(words.detach()[ids].float())
        holder = getattr(model, PROMPTS_ATTR, None)
        if holder is None:
            holder = SoftPrompts()
            setattr(model, PROMPTS_ATTR, holder)
            holder.attach(model)
        holder.encoders[name] = encoder.to(words.device)
        holder.configs[name] = config
        holder.train(model.training)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        encoder = getattr(model, PROMPTS_ATTR).encoders[name]
        # While the change is zero (always so right after inject, where files are read into it) the
        # prompt is the context itself, so a file's values load into it; later the sum is written.
        if not bool(encoder.delta.detach().any()):
            return {FILE_KEY: encoder.context}
        with torch.no_grad():
            return {FILE_KEY: encoder()}

    def after_step(self, model: nn.Module, name: str, config: AdapterConfig, step: int) -> None:
        getattr(model, PROMPTS_ATTR).encoders[name].project_()


register_method("CPT", CPTMethod())
