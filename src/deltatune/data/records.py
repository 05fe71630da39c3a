"""Reading training data files through the ``datasets`` library, with errors that name the place.

JSONL, JSON, CSV and Parquet files and ``save_to_disk`` folders. JSONL is checked line by line
first, so a malformed line is reported with its file and line number rather than as a
parser error from deep inside ``datasets``.
"""

from __future__ import annotations

import json
from pathlib import Path

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad training data: the message names the file, line or field."""


def _check_jsonl(path: Path) -> None:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}")


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
        except FileNotFoundError as err:
            raise DataError(f"{path}: not a folder written by Dataset.save_to_disk ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (has {list(loaded)})")
            loaded = loaded["train"]
        return loaded
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")
    if path.suffix.lower() == ".jsonl":
        _check_jsonl(path)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types; name the file in every case
        raise DataError(f"{path}: could not be read as {kind} ({type(err).__name__}: {err})") from None
