"""Reading training data files through the ``datasets`` library, with errors that name the place.

JSONL, JSON, CSV and Parquet files and ``save_to_disk`` folders. Text files are checked first
(UTF-8, JSON syntax line by line, the same number of CSV fields on every row), so a malformed
line is reported with its file and line number rather than as a parser error from deep
inside ``datasets``.
"""

from __future__ import annotations

import codecs
import csv
import json
import random
from pathlib import Path
from typing import Iterator, TypeVar

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


T = TypeVar("T")


def split_validation(rows: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation): a seeded ``fraction`` of ``rows`` held out, both in file order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(rows) * fraction)) if len(rows) > 1 else 0
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]


class DataError(ValueError):
    """Bad training data: the message names the file, line or field."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(number, line)`` for each line of a UTF-8 text file, read one at a time (a BOM is
    allowed); undecodable bytes are reported with their line."""
    with open(path, "rb") as f:
        # Binary lines end at "\n" only; str.splitlines() would also split inside JSON strings at U+2028.
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x})") from None


def _check_jsonl(path: Path) -> None:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        except (ValueError, RecursionError) as err:  # a 5000-digit integer, nesting too deep
            raise DataError(f"{path}:{number}: not valid JSON ({type(err).__name__}: {err})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}")


def _check_json(path: Path) -> None:
    """A .json file holds an array of objects (or, as ``datasets`` allows, one object per line)."""
    text = "".join(line for _, line in _lines(path))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several values: JSON Lines in a .json file
            return _check_jsonl(path)
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # a 5000-digit integer, nesting too deep
        raise DataError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise DataError(f"{path}: item {index} of the array is not a JSON object (got {type(item).__name__})")
    elif not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")


def _check_csv(path: Path) -> None:
    """Every row has the header's number of fields (pandas would silently shift a longer row)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, path.stat().st_size))  # a long text in one cell is fine
    reader = csv.reader(line for _, line in _lines(path))
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: no header row (the first line names the columns)")
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(row)} field(s), but the header has {len(header)}")
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)


def _reason(err: BaseException) -> str:
    """The innermost cause of a ``datasets`` error (its own wrapper says only that generation failed)."""
    for _ in range(20):  # a chain is short; the bound only guards against a cycle
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 400 else text[:397] + "..."


def load_records(path: str | Path):
    """A ``datasets.Dataset`` of the records in ``path`` (a file, or a ``save_to_disk`` folder)."""
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data {str(path)!r} not found: give a .jsonl, .json, .csv or .parquet file or a "
                        "folder written by Dataset.save_to_disk")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # a missing or damaged file of the folder: many types
            raise DataError(f"{path}: not a folder written by Dataset.save_to_disk ({_reason(err)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (has {list(loaded)})")
            loaded = loaded["train"]
        return loaded
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")
    check = {".jsonl": _check_jsonl, ".json": _check_json, ".csv": _check_csv}.get(path.suffix.lower())
    try:
        if check is not None:
            check(path)
    except OSError as err:
        raise DataError(f"{path}: could not be read ({err.strerror or err})") from None
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types; name the file in every case
        raise DataError(f"{path}: could not be read as {kind} ({_reason(err)})") from None
