"""Training data: files -> records -> token ids and labels -> (packed) batches.

``prepare_data(config, tokenizer)`` does it all and reports what it did (counts of examples,
tokens, truncated and dropped ones) for the train and validation splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .formats import detect_format, segments
from .packing import collate, pack, trained_token_count
from .records import DataError, load_records, split_validation
from .tasks import task_column, task_id_of
from .tokenize import Example, TokenizeStats, has_trained_token, tokenize_record, tokenize_seq2seq, truncate

__all__ = ["DataConfig", "DataError", "PreparedData", "prepare_data", "collate", "pack", "load_records",
           "Example", "TokenizeStats", "trained_token_count"]


@dataclass
class DataConfig:
    """Where the training data is and how to read it."""

    path: str = ""
    """Training data: a .jsonl/.json/.csv/.parquet file or a save_to_disk folder (empty: the shipped default)."""
    validation_path: str = ""
    """Validation data file; empty: hold out validation_fraction of the training data."""
    test_path: str = ""
    """Test data file for the final evaluation (base against tuned), used for nothing else: no choice during training looks at it. Empty: the final evaluation uses the validation split."""
    validation_fraction: float = 0.1
    """Share of the training records held out for validation when there is no validation file."""
    format: str = "auto"
    """auto, chat, prompt_completion, instruction or text."""
    columns: dict = field(default_factory=dict)
    """Map format field names to your columns, e.g. {prompt: question, completion: answer}."""
    max_seq_len: int = 512
    """Longest example in tokens; longer ones are cut (and counted)."""
    train_on_prompt: bool = False
    """Take the loss on prompt tokens too (default: completions / assistant turns only)."""
    packing: bool = False
    """Pack several examples into each row (positions restart; no attention across examples)."""
    chat_template: bool = False
    """Render prompt/completion and instruction records as a one-turn chat with the tokenizer's template."""


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    train_stats: TokenizeStats
    validation_stats: TokenizeStats
    format: str
    seq2seq: bool = False
    validation_records: list = field(default_factory=list)  # the raw held-out records (for evaluation)


def _tokenize_split(records, config: DataConfig, tokenizer, fmt: str, where: str,
                    seq2seq: bool = False, tasks: Optional[str] = None) -> tuple[list, TokenizeStats]:
    stats = TokenizeStats()
    out: list[Example] = []
    for index, record in enumerate(records):
        task_id = task_id_of(record, tasks, index, where)
        parts = segments(record, fmt, config.columns, index, where)
        if seq2seq:
            if fmt not in ("seq2seq", "prompt_completion", "instruction"):
                raise DataError(f"{where}format {fmt!r} does not fit a sequence-to-sequence model; use "
                                "source/target, prompt/completion or instruction/output records")
            example = tokenize_seq2seq(tokenizer, parts[0][0], parts[1][0])
        elif config.chat_template and fmt in ("prompt_completion", "instruction", "seq2seq"):
            parts = [{"role": "user", "content": parts[0][0]}, {"role": "assistant", "content": parts[1][0]}]
            example = tokenize_record(tokenizer, parts, "chat", index, config.train_on_prompt, where)
        else:
            example = tokenize_record(tokenizer, parts, fmt, index, config.train_on_prompt, where)
        example.task_id = task_id
        example, cut = truncate(example, config.max_seq_len, seq2seq)
        stats.truncated += cut
        if not has_trained_token(example, seq2seq):
            stats.dropped += 1
            stats.dropped_indices.append(index)
            continue
        stats.examples += 1
        stats.tokens += len(example.input_ids)
        stats.trained_tokens += sum(label != -100 for label in (example.labels if seq2seq else example.labels[1:]))
        out.append(example)
    return out, stats


def _check_config(config: DataConfig) -> None:
    """Refuse settings that would make the splits or lengths meaningless."""
    if isinstance(config.max_seq_len, bool) or not isinstance(config.max_seq_len, int) or config.max_seq_len < 1:
        raise DataError(f"data.max_seq_len must be a positive integer, got {config.max_seq_len!r}")
    fraction = config.validation_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise DataError(f"data.validation_fraction must be in [0, 1), got {fraction!r}")


def _rows(records, where: str) -> list[dict]:
    """The records as dicts. A ``save_to_disk`` folder is read lazily, so damage in its Arrow
    files can surface only here."""
    try:
        return [dict(r) for r in records]
    except Exception as err:  # pyarrow and datasets raise many types
        raise DataError(f"{where}could not be read ({type(err).__name__}: {err})") from None


def _same_tasks(tasks: Optional[str], records, config: DataConfig, path: str, split: str) -> Optional[str]:
    """The task id column of a validation or test file, which must have one exactly when the
    training data has one."""
    found = task_column(records.column_names, config.columns, f"{path}: ")
    if (found is None) != (tasks is None):
        raise DataError(f"{path}: the training data {'has' if tasks else 'has no'} a task id column and the "
                        f"{split} data {'has' if found else 'has no'} one; give both or neither")
    return found


def prepare_data(config: DataConfig, tokenizer, seed: int = 0, default_path: Optional[str] = None,
                 seq2seq: bool = False) -> PreparedData:
    """Read, split, tokenize and check the data of ``config`` (``seq2seq``: for an encoder-decoder)."""
    if seq2seq and config.packing:
        raise DataError("data.packing works with causal language models only, not sequence-to-sequence ones")
    if tokenizer is None:
        raise DataError("training needs a tokenizer; the model folder has no tokenizer files")
    _check_config(config)
    path = config.path or default_path
    if not path:
        raise DataError("no training data: set data.path")
    records = load_records(path)
    where = f"{path}: "
    fmt = detect_format(records.column_names, config.columns, config.format, where)
    tasks = task_column(records.column_names, config.columns, where)
    if tasks and config.packing:
        raise DataError(f"{where}data.packing puts several records in one row, but a row has one task: "
                        f"the {tasks!r} column needs unpacked rows (turn packing off)")
    rows = _rows(records, where)
    if not rows:
        raise DataError(f"{where}the dataset is empty")
    val_tasks = tasks
    if config.validation_path:
        val_records = load_records(config.validation_path)
        # The validation file must have the training format's columns (detect_format checks them).
        detect_format(val_records.column_names, config.columns, fmt, f"{config.validation_path}: ")
        val_tasks = _same_tasks(tasks, val_records, config, config.validation_path, "validation")
        val_rows, val_where = _rows(val_records, f"{config.validation_path}: "), f"{config.validation_path}: "
    else:
        rows, val_rows = split_validation(rows, config.validation_fraction, seed)
        val_where = where
    if config.test_path:  # the final evaluation gives each record its task too: the test file needs the column
        _same_tasks(tasks, load_records(config.test_path), config, config.test_path, "test")
    train, train_stats = _tokenize_split(rows, config, tokenizer, fmt, where, seq2seq, tasks)
    if not train:
        raise DataError(f"{where}no example has a trained token within max_seq_len={config.max_seq_len} "
                        f"({train_stats.dropped} dropped); raise max_seq_len")
    validation, val_stats = _tokenize_split(val_rows, config, tokenizer, fmt, val_where, seq2seq, val_tasks)
    return PreparedData(train, validation, train_stats, val_stats, fmt, seq2seq, val_rows)
