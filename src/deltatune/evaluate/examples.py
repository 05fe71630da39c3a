"""Evaluation examples: what the model is given, the reference it should produce, and (for
multiple choice) the choices. Data formats are those of training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..data import DataConfig, DataError, load_records
from ..data.formats import detect_format, segments
from ..data.tasks import task_column, task_id_of
from ..data.tokenize import Example, tokenize_record, tokenize_seq2seq


@dataclass
class EvalExample:
    id: int
    prompt: str  # as shown in reports (the rendered prompt for chats)
    input_ids: list[int]  # what generation starts from (the encoder input for seq2seq)
    reference: str
    scored: Example  # prompt + reference with labels on the reference (for perplexity)
    choices: list[str] = field(default_factory=list)
    answer: Optional[int] = None


def _render_chat(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_eval_examples(path: str, tokenizer, config: DataConfig, seq2seq: bool, limit: int = 0) -> list[EvalExample]:
    """Examples with references from ``path`` (errors name the file and record)."""
    records = load_records(path)
    where = f"{path}: "
    if len(records) == 0:
        raise DataError(f"{where}the dataset is empty")
    fmt = detect_format(records.column_names, config.columns, config.format, where)
    if fmt == "text":
        raise DataError(f"{where}records have only 'text': evaluation needs a reference (prompt/completion, "
                        "instruction/output, messages or source/target)")
    tasks = task_column(records.column_names, config.columns, where)
    out = []
    for index, record in enumerate(records):
        if limit and len(out) >= limit:
            break
        record = dict(record)
        task_id = task_id_of(record, tasks, index, where)
        parts = segments(record, fmt, config.columns, index, where)
        if fmt == "chat":
            if parts[-1]["role"] != "assistant":
                raise DataError(f"{where}record {index}: the last message must be the assistant's reference answer")
            prompt, reference = _render_chat(tokenizer, parts[:-1]), parts[-1]["content"]
            prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            scored = tokenize_record(tokenizer, parts, "chat", index, where=where)
        else:
            (prompt, _), (reference, _) = parts
            if not str(reference).strip():
                raise DataError(f"{where}record {index}: the reference is empty")
            if seq2seq:
                scored = tokenize_seq2seq(tokenizer, prompt, reference)
                prompt_ids = scored.input_ids
            elif config.chat_template:
                chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}]
                scored = tokenize_record(tokenizer, chat, "chat", index, where=where)
                prompt = _render_chat(tokenizer, chat[:1])
                prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            else:
                scored = tokenize_record(tokenizer, parts, fmt, index, where=where)
                prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        scored.task_id = task_id  # generation and the loss pick each record's task (task-routed adapters)
        choices, answer = _choices(record, index, where)
        out.append(EvalExample(index, prompt, prompt_ids, str(reference), scored, choices, answer))
    return out


def _choices(record: dict, index: int, where: str) -> tuple[list[str], Optional[int]]:
    choices = record.get("choices")
    if not choices:
        return [], None
    answer = record.get("answer")
    if isinstance(answer, str):
        if answer not in choices:
            raise DataError(f"{where}record {index}: answer {answer!r} is not one of the choices")
        answer = choices.index(answer)
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}record {index}: 'answer' must be a choice or its index")
    return [str(c) for c in choices], answer
