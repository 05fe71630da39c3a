"""The optional ``task_id`` column: which task each record belongs to.

Task-routed adapters (Poly / MHR, multitask prompt tuning) pick their weights per row by task;
a ``task_id`` column (or the column ``columns: {task_id: <yours>}`` names) gives each record's
task as a non-negative integer. The ids travel with the tokenized example into every batch
(``task_ids``), into validation and into the final evaluation's generation.
"""

from __future__ import annotations

from typing import Optional

from .records import DataError

TASK_FIELD = "task_id"


def task_column(column_names: list[str], columns: dict[str, str], where: str = "") -> Optional[str]:
    """The dataset's task id column, or None when it has none (``where`` starts errors: the file)."""
    name = columns.get(TASK_FIELD, TASK_FIELD)
    if name not in column_names:
        if TASK_FIELD in columns:  # asked for by name: a missing column is a mistake, not "no tasks"
            raise DataError(f"{where}data.columns maps task_id to {name!r}, but the data has no such column "
                            f"(columns: {sorted(column_names)})")
        return None
    return name


def task_id_of(record: dict, column: Optional[str], index: int, where: str = "") -> Optional[int]:
    """Record ``index``'s task id from ``column`` (None when the data has no task column)."""
    if column is None:
        return None
    value = record.get(column)
    if isinstance(value, float) and value.is_integer():  # CSV and Parquet may read integers as floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}record {index}: field {column!r} must be a task index (an integer >= 0), "
                        f"got {value!r}")
    return value
