"""``load_run`` and ``Run``: a run directory read back, with what could not be read named."""

from __future__ import annotations

import math
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .. import records
from .files import KERNELS_DIR, META_FILE, METRICS_FILE, PathLike, kernel_name, resolve
from .reading import header_fields, kernel_files, read_forecast, read_meta, read_records
from .summary import read_summary
from .table import to_csv, to_dataframe
from .writer import KEEP_KERNELS, check_step

__all__ = ["Curve", "DenseForecast", "Run", "load_run"]


class DenseForecast(NamedTuple):
    """A run's dense forecast (``forecast.json``): the predicted fields at many steps.

    Attributes:
        steps: int64 ``(S,)``, increasing.
        columns: record field name -> float64 ``(S,)`` (NaN where a value is missing).
    """

    steps: np.ndarray
    columns: Dict[str, np.ndarray]


class Curve(NamedTuple):
    """One split's curves at the measurements that have both (``Run.predicted_vs_actual``).

    Attributes:
        steps: int64 ``(M,)``, the measured optimizer steps.
        actual: float64 ``(M,)``, the network's loss there.
        predicted: float64 ``(M,)``, the forecast's loss there.
    """

    steps: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray


def _probe_size(meta: Mapping[str, Any]) -> Optional[int]:
    """The probe size the tracker recorded in ``meta["probe"]["size"]``, if any."""
    probe = meta.get("probe")
    size = probe.get("size") if isinstance(probe, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def load_run(path: PathLike) -> "Run":
    """Load a run directory written by ``RunWriter``.

    Every readable record is loaded and every readable kernel file listed; what is not
    readable, or is suspicious, is reported in ``Run.problems`` and in one
    ``RuntimeWarning`` (see :mod:`ntk_torch.runs.reading` for the checks): unreadable
    lines of ``metrics.jsonl`` (the last one cut short by a crash, a corrupt one, one
    nested too deeply or too long, one without a valid step) are skipped; repeated or
    out-of-order steps and absurdly large numbers are reported; a missing or empty
    ``metrics.jsonl`` is reported; unreadable kernel files (truncated, empty, not
    ``.npy``, Python objects) are left out of ``kernel_steps``; kernels of a shape no
    probe kernel has are reported. Kernels are read on demand by ``Run.kernel``. Nothing
    is unpickled. Only a bad ``meta.json`` is an error.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a run (no ``meta.json``).
        ValueError: ``meta.json`` is unreadable or not an ntk_torch run's.
    """
    path = resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an ntk_torch run directory (no {META_FILE})")
    fields, meta_problems = header_fields(read_meta(path), KEEP_KERNELS)
    loaded, skipped_lines, odd_records = read_records(path / METRICS_FILE)
    steps, skipped_kernels, odd_kernels = kernel_files(path, _probe_size(fields["meta"]))
    problems = meta_problems + [f"{METRICS_FILE} {line} skipped" for line in skipped_lines]
    problems += odd_records + skipped_kernels + odd_kernels
    if problems:
        parts = list(meta_problems)
        if skipped_lines:
            parts.append(
                f"skipped {len(skipped_lines)} unreadable line(s) of {METRICS_FILE}, loaded "
                f"{len(loaded)} record(s): " + "; ".join(skipped_lines)
            )
        parts += odd_records + skipped_kernels + odd_kernels
        warnings.warn(f"{path}: " + "; ".join(parts), RuntimeWarning, stacklevel=2)
    return Run(path, fields["meta"], loaded, keep_kernels=fields["keep_kernels"], status=fields["status"],
               reason=fields["reason"], problems=problems, kernel_steps=steps)


def _flatten(record: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, leaf value) pairs of a nested dict: {"a": {"b": 1}} -> ("a.b", 1)."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bool is an int: True -> 1.0


def _column(values: List[Any]) -> np.ndarray:
    """One metric over all records (None where absent) as a numpy array.

    Numbers -> float64 (N,), NaN where absent or None. Lists of numbers -> float64
    (N, L), L the longest list, padded with NaN. Anything else -> object (N,).
    """
    present = [v for v in values if v is not None]
    if all(_is_number(v) for v in present):
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    if all(isinstance(v, list) and all(_is_number(x) for x in v) for v in present):
        table = np.full((len(values), max(len(v) for v in present)), np.nan)
        for row, v in enumerate(values):
            if v:
                table[row, : len(v)] = v
        return table
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class Run:
    """A loaded run directory.

    Attributes:
        path: the run directory, resolved.
        meta: the metadata dict given to ``RunWriter``.
        records: the readable records of ``metrics.jsonl``, in file order, as dicts.
        keep_kernels: the kernel policy the run was written with.
        status: how the run ended as given to ``RunWriter.close`` (``"completed"``,
            ``"interrupted"``, ``"failed"``), or None if it was not given (or the writer
            never closed: a run still being written, or a process killed outright).
        reason: why it ended so, when given (e.g. the exception of a failed run), or None.
        problems: one line per thing ``load_run`` skipped or found suspicious, naming the
            file (and line): unreadable lines and kernel files (skipped), repeated or
            out-of-order steps, absurd values, a missing or empty ``metrics.jsonl``,
            kernels of an unexpected shape. Empty for an intact run.
    """

    def __init__(
        self,
        path: Path,
        meta: Dict[str, Any],
        records: List[Dict[str, Any]],
        *,
        keep_kernels: Optional[str] = None,
        status: Optional[str] = None,
        reason: Optional[str] = None,
        problems: Sequence[str] = (),
        kernel_steps: Optional[Sequence[int]] = None,
    ) -> None:
        self.path = Path(path)
        self.meta = meta
        self.records = records
        self.keep_kernels = keep_kernels
        self.status = status
        self.reason = reason
        self.problems: List[str] = list(problems)
        self._kernel_steps = None if kernel_steps is None else np.array(sorted(kernel_steps), dtype=np.int64)

    @cached_property
    def steps(self) -> np.ndarray:
        """The step of each record, int64 (len(records),)."""
        return np.array([record[records.STEP] for record in self.records], dtype=np.int64)

    @cached_property
    def metrics(self) -> Dict[str, np.ndarray]:
        """Column name -> one array over the records (row r is ``records[r]``; index with
        ``steps``). ``"step"`` itself is in ``steps``, not here.

        Nested dicts are flattened to dotted names (``layer_share.0.weight``). A column of
        numbers is float64 (R,), NaN where a record lacks it or holds None; a column of
        lists of numbers is float64 (R, L), padded with NaN to the longest list; any other
        column (strings, mixed values) is an object array (R,) with None where absent.
        """
        flat = [dict(_flatten(record)) for record in self.records]
        names = dict.fromkeys(name for row in flat for name in row if name != records.STEP)
        return {name: _column([row.get(name) for row in flat]) for name in names}

    @property
    def kernel_steps(self) -> np.ndarray:
        """Sorted steps with a readable kernel file, int64: as found by ``load_run`` (a
        ``Run`` made directly lists the kernel files on disk now)."""
        if self._kernel_steps is not None:
            return self._kernel_steps
        steps, _, _ = kernel_files(self.path, None)
        return np.array(steps, dtype=np.int64)

    def kernel(self, step: int) -> np.ndarray:
        """The kernel saved at ``step``, as written (e.g. (N1, N2, O, O)).

        Raises:
            FileNotFoundError: no kernel was kept for ``step`` (names the file and the
                steps that have one).
            ValueError: the file is not a readable ``.npy`` array.
        """
        file = self.path / KERNELS_DIR / kernel_name(check_step(step, "step"))
        if not file.is_file():
            available = self.kernel_steps.tolist()
            known = f"kernels exist for steps {available}" if available else "no kernels saved"
            raise FileNotFoundError(f"{file} does not exist; this run has {known}")
        try:
            array = np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"{file} is not a readable .npy kernel file: {error}") from error
        if not isinstance(array, np.ndarray):  # np.load opens a zip archive as an NpzFile
            array.close()
            raise ValueError(f"{file} is not a readable .npy kernel file: not a single array")
        return array

    def first_finite(self, column: str) -> Optional[Tuple[float, int]]:
        """The first finite value of a numeric column and its step, or None (no such
        column, not numeric, or no finite value)."""
        return self._finite_value(column, 0)

    def last_finite(self, column: str) -> Optional[Tuple[float, int]]:
        """The last finite value of a numeric column and its step, or None (no such
        column, not numeric, or no finite value)."""
        return self._finite_value(column, -1)

    def _finite_value(self, column: str, position: int) -> Optional[Tuple[float, int]]:
        """``(value, step)`` of the ``position``-th finite value of a numeric (R,) column."""
        values = self.metrics.get(column)
        if values is None or values.dtype == object or values.ndim != 1:
            return None
        finite = np.flatnonzero(np.isfinite(values))
        if not len(finite):
            return None
        row = finite[position]
        return float(values[row]), int(self.steps[row])

    @cached_property
    def dense_forecast(self) -> Optional[DenseForecast]:
        """The forecast at every step up to 1000 and on the log schedule beyond (the
        kernel forecast) or at the measurements and log-spaced steps (the twin), as the
        tracker wrote it when it closed; None for a run without one (or an unreadable
        file, named in :attr:`problems` and a ``RuntimeWarning``)."""
        dense, problem = read_forecast(self.path)
        if problem is not None:
            self.problems.append(problem)
            warnings.warn(f"{self.path}: {problem}", RuntimeWarning, stacklevel=2)
        return None if dense is None else DenseForecast(*dense)

    def predicted_vs_actual(self) -> Dict[str, Curve]:
        """The tracker's actual and predicted loss curves: ``{split: Curve(steps, actual,
        predicted)}`` for ``"train"`` and ``"test"``, at the measurements that have both
        (empty when the run has no forecast)."""
        columns = self.metrics
        curves = {}
        for split in records.FORECAST_SPLITS:
            actual = columns.get(records.actual(split))
            predicted = columns.get(records.predicted(split))
            if actual is None or predicted is None or actual.ndim != 1 or predicted.ndim != 1:
                continue
            if actual.dtype == object or predicted.dtype == object:
                continue
            both = np.isfinite(actual) & np.isfinite(predicted)
            if both.any():
                curves[split] = Curve(self.steps[both], actual[both], predicted[both])
        return curves

    @cached_property
    def summary(self) -> Optional[Dict[str, Any]]:
        """``summary.json`` as written when the run closed (final values, configuration,
        versions; see :mod:`ntk_torch.runs.summary`), or None for a run not closed yet or
        written before summaries existed. An unreadable file is named in :attr:`problems`
        and a ``RuntimeWarning``, and gives None."""
        try:
            return read_summary(self.path)
        except (ValueError, OSError) as error:
            self.problems.append(str(error))
            warnings.warn(f"{self.path}: {error}", RuntimeWarning, stacklevel=2)
            return None

    def to_dataframe(self) -> Any:
        """The records as a ``pandas.DataFrame``: one row per record, ``step`` then every
        column of :attr:`metrics` (list columns split into ``name.0``, ``name.1``, ...).
        Needs pandas (``pip install 'ntk-torch[pandas]'``)."""
        return to_dataframe(self)

    def to_csv(self, path: PathLike) -> Path:
        """Write the table of :meth:`to_dataframe` to the CSV file ``path`` (no pandas
        needed; written atomically); the resolved path written."""
        return to_csv(self, path)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        problems = f", {len(self.problems)} problem(s)" if self.problems else ""
        return (
            f"Run({str(self.path)!r}, {len(self.records)} records, "
            f"kernels at {len(self.kernel_steps)} steps{problems})"
        )
