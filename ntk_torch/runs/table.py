"""A run's records as one table: a CSV file (no extra dependency) or a pandas DataFrame.

One row per record, in file order; the columns are ``step`` then every column of
``Run.metrics`` (nested dicts flattened to dotted names). A list column (``top_eigenvalues``,
``(R, L)``) becomes ``L`` columns ``name.0`` ... ``name.{L-1}``; numbers are float64 with NaN
where a record lacks the field; other values (strings) are kept as they are, empty where
absent.
"""

from __future__ import annotations

import csv
import io
import math
from typing import TYPE_CHECKING, Any, Dict, List

import numpy as np

from .files import PathLike, atomic_write, resolve

if TYPE_CHECKING:
    from .run import Run

__all__ = ["table_columns", "to_csv", "to_dataframe"]


def table_columns(run: "Run") -> Dict[str, np.ndarray]:
    """Column name -> one value per record (``(R,)`` arrays), ``step`` first."""
    columns: Dict[str, np.ndarray] = {"step": run.steps}
    for name, values in run.metrics.items():
        if values.ndim == 2:
            for index in range(values.shape[1]):
                columns[f"{name}.{index}"] = values[:, index]
        else:
            columns[name] = values
    return columns


def to_dataframe(run: "Run") -> Any:
    """The table as a ``pandas.DataFrame`` (pandas is the optional extra ``pandas``)."""
    try:
        import pandas
    except ImportError:
        raise ImportError("Run.to_dataframe needs pandas: pip install 'ntk-torch[pandas]'") from None
    return pandas.DataFrame(table_columns(run))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def to_csv(run: "Run", path: PathLike) -> Any:
    """Write the table to the CSV file ``path`` (resolved; written atomically, replacing
    a file there); the path written. Missing values are empty cells, floats are written
    exactly (``repr``), infinities as ``inf``.

    Raises:
        ValueError: ``path`` is a directory, or its directory does not exist.
    """
    target = resolve(path, "path")
    if target.is_dir():
        raise ValueError(f"path {target} is a directory; give a CSV file name")
    if not target.parent.is_dir():
        raise ValueError(f"path {target}: the directory {target.parent} does not exist")
    columns = table_columns(run)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(columns))
    rows: List[List[Any]] = [[_cell(values[row]) for values in columns.values()] for row in range(len(run))]
    writer.writerows(rows)
    encoded = buffer.getvalue().encode()
    atomic_write(target, lambda file: file.write(encoded))
    return target
