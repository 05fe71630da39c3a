"""Preference data (``deltatune train --objective dpo|orpo``): a prompt, a chosen and a rejected completion.

Records take TRL's layouts (columns renamed with ``data.columns``):

- text: ``prompt``, ``chosen``, ``rejected`` strings. The prompt is tokenized with the tokenizer's
  special tokens, each completion after it; with ``data.chat_template`` the pair is rendered as a
  one-turn chat (the prompt as the user's turn), as the SFT path renders prompt/completion records.
- chat with an explicit prompt: ``prompt`` a list of ``{role, content}`` messages, ``chosen`` and
  ``rejected`` lists of assistant messages (or strings, read as one assistant message each).
- chat with the prompt inside: no ``prompt`` column, ``chosen`` and ``rejected`` whole
  conversations that begin with the same messages; those shared messages are the prompt, and what
  follows them in each (assistant messages only) is its completion.

Chats are rendered with the tokenizer's chat template; the completion is every token after the
rendered prompt (with its generation prompt), which must be a prefix of the rendered conversation.
EOS ends every completion (appended when the completion does not hold it). Only completion
tokens are trained (labels -100 on the prompt). Truncation: the prompt is kept whole and each
completion is cut at its end so that prompt + completion fit ``max_seq_len`` (counted); a pair
whose prompt alone takes ``max_seq_len`` tokens has nothing left to compare and is dropped
(counted). Errors name the file, the line (JSON Lines; the record's index otherwise) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .records import DataError, _check_jsonl, _lines, load_records, split_validation
from .tokenize import IGNORE, Example, TokenizeStats

FIELDS = ("prompt", "chosen", "rejected")
FORMAT = "preference"  # data.format's name for these records


@dataclass
class PreferencePair:
    """One tokenized pair: the prompt's ids and each completion's (prompt excluded)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def width(self) -> int:
        """Positions the pair takes in a batch: its chosen and rejected rows, padded to the longer."""
        return 2 * (len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids)))

    def examples(self) -> tuple[Example, Example]:
        """The chosen and the rejected row, labels -100 on the prompt."""
        masked = [IGNORE] * len(self.prompt_ids)
        return (Example(self.prompt_ids + self.chosen_ids, masked + self.chosen_ids),
                Example(self.prompt_ids + self.rejected_ids, masked + self.rejected_ids))


@dataclass
class PreferenceStats(TokenizeStats):
    """Counts reported after tokenizing a split of pairs (examples are pairs)."""

    def __str__(self) -> str:
        return (f"{self.examples} pairs, {self.tokens} tokens ({self.trained_tokens} in completions); "
                f"{self.truncated} truncated, {self.dropped} dropped (the prompt fills max_seq_len)")


@dataclass
class PreparedPreferenceData:
    """What ``prepare_preference_data`` returns (the names ``PreparedData`` uses for the SFT splits)."""

    train: list[PreferencePair]
    validation: list[PreferencePair]
    train_stats: PreferenceStats
    validation_stats: PreferenceStats
    format: str = FORMAT
    validation_records: list = field(default_factory=list)


def is_preference_data(column_names, columns: dict) -> bool:
    """Whether records with these columns are preference pairs (``chosen`` and ``rejected``)."""
    return all(columns.get(name, name) in column_names for name in ("chosen", "rejected"))


def read_preference_records(path: str | Path, columns: dict, objective: str = "dpo") -> list[tuple[str, dict]]:
    """``[(where, record)]`` of a data file: ``where`` names the file and line (JSON Lines) or the
    record's index, for error messages. Refuses files without ``chosen``/``rejected`` columns."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".jsonl" and path.is_file():
        _check_jsonl(path)  # JSON syntax, objects, UTF-8: errors with the line
        rows = [(f"{path}:{number}: ", json.loads(line)) for number, line in _lines(path) if line.strip()]
        names = set().union(*(row.keys() for _, row in rows)) if rows else set()
    else:
        records = load_records(path)
        names = set(records.column_names)
        try:
            rows = [(f"{path}: record {i}: ", dict(r)) for i, r in enumerate(records)]
        except Exception as err:  # a damaged save_to_disk folder surfaces only when read
            raise DataError(f"{path}: could not be read ({type(err).__name__}: {err})") from None
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    if not is_preference_data(names, columns):
        wanted = [columns.get(n, n) for n in FIELDS]
        raise DataError(f"{path}: objective {objective} needs preference pairs, columns {wanted} ('prompt' may be "
                        f"left out when chosen and rejected are chats that share their first messages); the data "
                        f"has {sorted(names)} (map yours with data.columns, or train with --objective sft)")
    return rows


def _messages(value, name: str, where: str) -> list[dict]:
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}field {name!r}: expected a non-empty list of {{role, content}} messages whose "
                        "role and content are text")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _value(record: dict, name: str, where: str, columns: dict):
    """The field as text or a message list; numbers read as text (a CSV of numbers), others refused."""
    column = columns.get(name, name)
    if column not in record or record[column] is None:
        raise DataError(f"{where}field {column!r} is missing; the record has {sorted(record)}")
    value = record[column]
    if isinstance(value, bool) or not isinstance(value, (str, int, float, list)):
        raise DataError(f"{where}field {column!r}: expected text or a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    return _messages(value, column, where) if isinstance(value, list) else str(value)


def _split_shared(chosen: list[dict], rejected: list[dict], where: str, columns: dict):
    """(prompt, chosen completion, rejected completion) of two chats that begin with the same messages."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{where}fields {columns.get('chosen', 'chosen')!r} and {columns.get('rejected', 'rejected')!r}"
                        ": without a 'prompt' field the two chats must begin with the same messages (the prompt)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def normalize(record: dict, where: str, columns: dict, chat_template: bool) -> tuple[object, object, object]:
    """(prompt, chosen, rejected) as three strings, or as three message lists (a chat)."""
    chosen = _value(record, "chosen", where, columns)
    rejected = _value(record, "rejected", where, columns)
    prompt_column = columns.get("prompt", "prompt")
    if record.get(prompt_column) is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(f"{where}field {prompt_column!r} is missing; it may be left out only when chosen and "
                            "rejected are chats (message lists) that begin with the same messages")
        prompt, chosen, rejected = _split_shared(chosen, rejected, where, columns)
    else:
        prompt = _value(record, "prompt", where, columns)
    parts = (prompt, chosen, rejected)
    if not any(isinstance(p, list) for p in parts) and not chat_template:
        return parts
    prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    chosen, rejected = ([{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in (chosen, rejected))
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise DataError(f"{where}field {columns.get(name, name)!r}: nothing after the prompt's messages")
        if any(m["role"] != "assistant" for m in completion):
            raise DataError(f"{where}field {columns.get(name, name)!r}: a completion holds assistant messages only "
                            f"(found role {next(m['role'] for m in completion if m['role'] != 'assistant')!r})")
    return prompt, chosen, rejected


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, TypeError, ValueError) as err:  # e.g. "roles must alternate"
        raise DataError(f"{where}the chat template refused the messages ({type(err).__name__}: {err})") from None


def tokenize_pair(tokenizer, prompt, chosen, rejected, where: str = "") -> PreferencePair:
    """One pair's ids (not yet truncated); chats through the chat template."""
    eos = tokenizer.eos_token_id
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}chat records need a tokenizer with a chat template")
        prompt_ids = _ids(tokenizer, _render(tokenizer, prompt, True, where), False)
        completions = []
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            ids = _ids(tokenizer, _render(tokenizer, prompt + completion, False, where), False)
            if ids[:len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
                raise DataError(f"{where}field {name!r}: the chat template does not render the prompt (with its "
                                "generation prompt) as a prefix of the conversation; cannot tell which tokens to train")
            completions.append(ids[len(prompt_ids):])
    else:
        prompt_ids = _ids(tokenizer, prompt, True)
        completions = [_ids(tokenizer, text, False) for text in (chosen, rejected)]
    if eos is not None:  # EOS ends every completion, so the preferred answer also teaches stopping
        completions = [ids if eos in ids else ids + [eos] for ids in completions]
    return PreferencePair(prompt_ids, completions[0], completions[1])


def truncate_pair(pair: PreferencePair, max_seq_len: int) -> tuple[Optional[PreferencePair], bool]:
    """(the pair cut to ``max_seq_len``, whether it was cut); None when the prompt leaves no room."""
    room = max_seq_len - len(pair.prompt_ids)
    if room < 1:
        return None, True
    cut = len(pair.chosen_ids) > room or len(pair.rejected_ids) > room
    return PreferencePair(pair.prompt_ids, pair.chosen_ids[:room], pair.rejected_ids[:room]), cut


def tokenize_preference_split(rows: list[tuple[str, dict]], tokenizer, columns: dict, chat_template: bool,
                              max_seq_len: int) -> tuple[list[PreferencePair], PreferenceStats]:
    """Tokenized, truncated pairs of ``rows`` (from ``read_preference_records``) and their counts."""
    stats = PreferenceStats()
    pairs = []
    for index, (where, record) in enumerate(rows):
        pair, cut = truncate_pair(tokenize_pair(tokenizer, *normalize(record, where, columns, chat_template), where),
                                  max_seq_len)
        stats.truncated += cut
        if pair is None:
            stats.dropped += 1
            stats.dropped_indices.append(index)
            continue
        stats.examples += 1
        stats.tokens += 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
        stats.trained_tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
        pairs.append(pair)
    return pairs, stats


def load_preference_pairs(path: str, tokenizer, config, objective: str = "dpo") -> tuple[list[PreferencePair], list]:
    """(pairs, records) of one file under the ``DataConfig`` settings ``config`` (for evaluation)."""
    rows = read_preference_records(path, config.columns, objective)
    pairs, _ = tokenize_preference_split(rows, tokenizer, config.columns, config.chat_template, config.max_seq_len)
    return pairs, [record for _, record in rows]


def prepare_preference_data(config, tokenizer, seed: int = 0, objective: str = "dpo") -> PreparedPreferenceData:
    """Read, split and tokenize the preference data of the ``DataConfig`` ``config``: a validation
    file, or ``validation_fraction`` of the training records held out with ``seed``."""
    if tokenizer is None:
        raise DataError("training needs a tokenizer; the model folder has no tokenizer files")
    if not config.path:
        raise DataError("no training data: set data.path")
    rows = read_preference_records(config.path, config.columns, objective)
    if config.validation_path:
        val_rows = read_preference_records(config.validation_path, config.columns, objective)
    else:
        rows, val_rows = split_validation(rows, config.validation_fraction, seed)
    settings = (config.columns, config.chat_template, config.max_seq_len)
    train, train_stats = tokenize_preference_split(rows, tokenizer, *settings)
    if not train:
        raise DataError(f"{config.path}: no pair has a completion token within max_seq_len={config.max_seq_len} "
                        f"({train_stats.dropped} dropped); raise max_seq_len")
    validation, val_stats = tokenize_preference_split(val_rows, tokenizer, *settings)
    return PreparedPreferenceData(train, validation, train_stats, val_stats, FORMAT,
                                  [record for _, record in val_rows])
