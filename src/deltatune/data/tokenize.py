"""Tokenizing records into ``input_ids`` and ``labels`` (-100 where no loss is taken).

By default the loss covers the completion only (assistant turns in chats); an EOS token ends
every trained part so that generation learns to stop. Examples longer than ``max_seq_len``
are cut; one with no trained token left is dropped. Both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from jinja2 import TemplateError

from .records import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    task_id: Optional[int] = None  # the record's task, for task-routed adapters (data/tasks.py)


@dataclass
class TokenizeStats:
    """Counts reported after tokenizing a split."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped_indices: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.trained_tokens} trained); "
                f"{self.truncated} truncated, {self.dropped} dropped (no trained token left)")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_ids(tokenizer, messages: list[dict], index: int, where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat and, per token, whether it belongs to an assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}record {index}: chat records need a tokenizer with a chat template")

    def render(msgs: list[dict], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except (TemplateError, TypeError, ValueError) as err:  # e.g. "roles must alternate"
            raise DataError(f"{where}record {index}: the chat template refused the messages "
                            f"({type(err).__name__}: {err})") from None

    ids = _ids(tokenizer, render(messages, False), False)
    trained = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, render(messages[:i], True), False)) if i else 0
        end = len(_ids(tokenizer, render(messages[: i + 1], False), False))
        if end > len(ids) or start > end:
            raise DataError(f"{where}record {index}: the chat template does not render message {i} as a prefix "
                            "of the whole conversation; cannot tell which tokens to train")
        for t in range(start, end):
            trained[t] = True
    return ids, trained


def tokenize_record(tokenizer, parts, fmt: str, index: int, train_on_prompt: bool = False,
                    where: str = "") -> Example:
    """One record's ``Example`` (not yet truncated)."""
    eos = tokenizer.eos_token_id
    if fmt == "chat":
        ids, trained = _chat_ids(tokenizer, parts, index, where)
        if eos is not None and eos not in [t for t, keep in zip(ids, trained) if keep]:
            ids.append(eos)
            trained.append(True)
    else:
        ids, trained = [], []
        for n, (text, is_trained) in enumerate(parts):
            piece = _ids(tokenizer, text, special=(n == 0))
            ids += piece
            trained += [is_trained] * len(piece)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            trained.append(True)
    labels = [t if (keep or train_on_prompt) else IGNORE for t, keep in zip(ids, trained)]
    return Example(ids, labels)


def tokenize_seq2seq(tokenizer, source: str, target: str) -> Example:
    """Encoder input and decoder labels (every target token trained; EOS appended if missing)."""
    input_ids = _ids(tokenizer, source, special=True)
    labels = _ids(tokenizer, target, special=False)
    eos = tokenizer.eos_token_id
    if eos is not None and (not labels or labels[-1] != eos):
        labels.append(eos)
    return Example(input_ids, labels)


def truncate(example: Example, max_seq_len: int, seq2seq: bool = False) -> tuple[Example, bool]:
    """(example cut to ``max_seq_len``, whether it was cut); seq2seq cuts input and target apart."""
    if seq2seq:
        cut = len(example.input_ids) > max_seq_len or len(example.labels) > max_seq_len
        return replace(example, input_ids=example.input_ids[:max_seq_len], labels=example.labels[:max_seq_len]), cut
    if len(example.input_ids) <= max_seq_len:
        return example, False
    return replace(example, input_ids=example.input_ids[:max_seq_len], labels=example.labels[:max_seq_len]), True


def has_trained_token(example: Example, seq2seq: bool = False) -> bool:
    # In a causal model the first token is never predicted (nothing comes before it).
    return any(label != IGNORE for label in (example.labels if seq2seq else example.labels[1:]))
