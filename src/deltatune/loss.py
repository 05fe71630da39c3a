"""The loss a training step minimises, computed only where there is something to learn.

A causal LM's own forward projects every position onto the vocabulary, prompt and padding
included, although their labels are ignored. In instruction tuning that is most positions, and
the output projection is the largest single matmul of a small model. ``TrainingLoss`` runs the
decoder stack, keeps the hidden states whose next-token label counts, and projects only those,
through ``kernels.linear_cross_entropy`` (no full logits) when the head is a plain linear. The
result is the model's own loss (the tests compare them); model classes whose forward does
more after the projection (soft-capping, logit scales) or whose top-level forward carries
hooks (soft prompts, task ids) use the model's forward, and the log says which path a run takes.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.task_ids import TASKS_ATTR
from .kernels import linear_cross_entropy

IGNORE_INDEX = -100

# Classes whose forward is ``lm_head(base_model(...)[0])`` followed by the shifted, mean-reduced
# cross-entropy; each is checked against its own loss in tests/unit/test_training_loss.py.
LABELLED_ONLY_CLASSES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                   "Qwen3ForCausalLM", "GPT2LMHeadModel", "Phi3ForCausalLM",
                                   # mixture-of-experts models, while their router loss is off (below)
                                   "Qwen3MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM",
                                   "GptOssForCausalLM"})


def why_model_loss(model: nn.Module) -> Optional[str]:
    """Why ``model`` needs its own forward for the loss, or None when only labelled positions can
    be projected."""
    name = type(model).__name__
    if name not in LABELLED_ONLY_CLASSES:
        return f"{name} is not among the classes checked for the labelled-positions loss"
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        return "the model's own forward adds its routers' load-balancing loss (output_router_logits)"
    if model._forward_hooks or model._forward_pre_hooks:
        return "hooks on the model's forward (soft prompts, task ids) need the model's own forward"
    return None


def cache_argument(module: nn.Module) -> Optional[str]:
    """The name under which ``module.forward`` takes a key/value cache (transformers renamed
    ``past_key_values`` to ``cache``), or None. Passing the wrong name would be swallowed by
    ``**kwargs`` and silently ignored, so it is read from the signature."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


class TrainingLoss(nn.Module):
    """``forward(batch) -> loss`` for one micro-batch (``input_ids``, ``labels``, masks)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.reason = why_model_loss(model)
        # where the decoder stack may take a key/value cache (read once: it inspects a signature)
        self.cache_name = cache_argument(model.base_model) if self.reason is None else None

    def describe(self) -> str:
        """One line for the run log."""
        if self.reason is not None:
            return f"loss: the model's own forward ({self.reason})"
        head = self.model.get_output_embeddings()
        fused = "fused with the output projection" if type(head) is nn.Linear else "through the adapted head"
        return f"loss: labelled positions only, {fused}"

    def hidden_states(self, inputs: dict[str, torch.Tensor], cache=None) -> torch.Tensor:
        """The decoder stack's last hidden states for ``inputs``; with ``cache`` (a transformers
        ``Cache`` of tokens preceding every row), continuing from it and adding to it."""
        if cache is None:
            return self.model.base_model(**inputs, use_cache=False)[0]
        if self.cache_name is None:
            raise ValueError(f"{type(self.model.base_model).__name__}.forward takes no key/value cache")
        return self.model.base_model(**inputs, **{self.cache_name: cache}, use_cache=True)[0]

    def forward(self, batch: dict[str, torch.Tensor], cache=None) -> torch.Tensor:
        """The mean loss over ``batch``'s labelled positions; ``cache``: see ``hidden_states``
        (``batch["attention_mask"]`` then covers the cached tokens too). A batch's ``task_ids``
        (from a task id column) reach a task-routed model and are left out for any other."""
        if "task_ids" in batch and getattr(self.model, TASKS_ATTR, None) is None:
            batch = {k: v for k, v in batch.items() if k != "task_ids"}
        if self.reason is not None:
            if cache is not None:
                raise ValueError(f"a cached prefix needs the labelled-positions loss, and {self.reason}")
            return self.model(**batch, use_cache=False).loss
        hidden = self.hidden_states({k: v for k, v in batch.items() if k != "labels"}, cache)
        labels = batch["labels"]
        # position t predicts token t + 1; the last position predicts nothing
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
        head = self.model.get_output_embeddings()
        if type(head) is nn.Linear:
            return linear_cross_entropy(hidden, head.weight, head.bias, targets)
        return F.cross_entropy(head(hidden).float(), targets)
