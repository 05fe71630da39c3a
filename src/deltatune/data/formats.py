"""Recognising a dataset's format from its columns and turning a record into text pieces.

A record becomes a list of ``(text, trained)`` segments, or a chat (a list of messages) that
the tokenizer's chat template renders. Recognised columns, in order of preference:
``messages`` (chat), ``prompt``/``completion``, ``instruction``/``input``/``output``, ``text``
(plain language modelling), ``source``/``target`` (sequence to sequence). ``columns`` maps
these names to the dataset's own.
"""

from __future__ import annotations

from typing import Optional

from .records import DataError

FORMATS = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
    "text": ("text",),
    "seq2seq": ("source", "target"),
}

# The Alpaca prompt layout, the usual one for instruction/input/output records.
_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_WITHOUT_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def detect_format(column_names: list[str], columns: dict[str, str], fmt: str = "auto", where: str = "") -> str:
    """The format name for a dataset with ``column_names`` (after the ``columns`` mapping)."""
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise DataError(f"{where}data.columns must map field names to column names (text to text), got {columns!r}")
    available = set(column_names)
    mapped = lambda name: columns.get(name, name)  # noqa: E731
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"{where}format {fmt!r} is not known; use one of {['auto', *FORMATS]}")
        missing = [mapped(n) for n in FORMATS[fmt] if mapped(n) not in available]
        if missing:
            raise DataError(f"{where}format {fmt!r} needs column(s) {missing}; the data has {sorted(available)}")
        return fmt
    for name, needed in FORMATS.items():
        if all(mapped(n) in available for n in needed):
            return name
    if {mapped("chosen"), mapped("rejected")} <= available:
        raise DataError(f"{where}these are preference pairs (columns {sorted(available)}): train them with "
                        "--objective dpo or --objective orpo")
    raise DataError(
        f"{where}no known format fits the columns {sorted(available)}: expected 'messages', "
        "'prompt'+'completion', 'instruction'+'output' (+'input') or 'text', or map yours with "
        "columns: {prompt: <your column>, completion: <your column>}"
    )


def segments(record: dict, fmt: str, columns: dict[str, str], index: int,
             where: str = "") -> list[tuple[str, bool]] | list[dict]:
    """``[(text, trained), ...]`` for text formats; the message list for ``chat``."""
    get = lambda name: _text(record, columns.get(name, name), index, where)  # noqa: E731
    if fmt == "chat":
        messages = _field(record, columns.get("messages", "messages"), index, where)
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError(f"{where}record {index}: 'messages' must be a non-empty list of "
                            "{role, content} objects whose role and content are text")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}record {index}: no assistant message to learn from")
        return messages
    if fmt == "prompt_completion":
        return [(get("prompt"), False), (get("completion"), True)]
    if fmt == "seq2seq":
        return [(get("source"), False), (get("target"), True)]
    if fmt == "instruction":
        name = columns.get("input", "input")
        extra: Optional[str] = _text(record, name, index, where) if record.get(name) is not None else None
        template = _WITH_INPUT if extra else _WITHOUT_INPUT
        prompt = template.format(instruction=get("instruction"), input=extra)
        return [(prompt, False), (get("output"), True)]
    return [(get("text"), True)]


def _field(record: dict, name: str, index: int, where: str):
    if name not in record or record[name] is None:
        raise DataError(f"{where}record {index}: field {name!r} is missing; the record has {sorted(record)}")
    return record[name]


def _text(record: dict, name: str, index: int, where: str) -> str:
    """A text field as text. Numbers are fine (a CSV column of answers is read as numbers);
    a list or an object is refused rather than trained on as its Python spelling."""
    value = _field(record, name, index, where)
    if not isinstance(value, (str, int, float)):
        raise DataError(f"{where}record {index}: field {name!r} must be text, got {type(value).__name__}")
    return str(value)
