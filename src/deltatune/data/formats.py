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
    raise DataError(
        f"{where}no known format fits the columns {sorted(available)}: expected 'messages', "
        "'prompt'+'completion', 'instruction'+'output' (+'input') or 'text', or map yours with "
        "columns: {prompt: <your column>, completion: <your column>}"
    )


def segments(record: dict, fmt: str, columns: dict[str, str], index: int,
             where: str = "") -> list[tuple[str, bool]] | list[dict]:
    """``[(text, trained), ...]`` for text formats; the message list for ``chat``."""
    get = lambda name: _field(record, columns.get(name, name), index, where)  # noqa: E731
    if fmt == "chat":
        messages = get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"{where}record {index}: 'messages' must be a non-empty list of "
                            "{role, content} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}record {index}: no assistant message to learn from")
        return messages
    if fmt == "prompt_completion":
        return [(str(get("prompt")), False), (str(get("completion")), True)]
    if fmt == "seq2seq":
        return [(str(get("source")), False), (str(get("target")), True)]
    if fmt == "instruction":
        extra: Optional[str] = record.get(columns.get("input", "input"))
        template = _WITH_INPUT if extra else _WITHOUT_INPUT
        prompt = template.format(instruction=get("instruction"), input=extra)
        return [(prompt, False), (str(get("output")), True)]
    return [(str(get("text")), True)]


def _field(record: dict, name: str, index: int, where: str):
    if name not in record or record[name] is None:
        raise DataError(f"{where}record {index}: field {name!r} is missing; the record has {sorted(record)}")
    return record[name]
