"""Run directories: written append-only with atomic replaces, loaded without unpickling.

Layout of a run directory::

    meta.json                  {"format": "ntk_torch.run", "version": 1,
                                "keep_kernels": "log", "meta": {...user metadata...},
                                "status": "completed"}   (status: once closed with one)
    metrics.jsonl              one JSON object per line, one line per measurement
    kernels/step_00000010.npy  kernel measured at optimizer step 10 (numpy .npy, no pickle)
    forecast.json              the dense forecast, written once when the tracker closes:
                               {"steps": [0, 1, 2, ...], "fields": {"predicted_train_loss":
                               [...], ...}} (optional; Run.dense_forecast)

Guarantees, so that a crash or Ctrl-C loses at most the record being written:

* ``meta.json`` and every kernel file are written to a temporary file in the same
  directory (``.<name>.<random>.tmp``), fsynced, then moved into place with
  ``os.replace``: a reader sees the old file or the new one, never a mix. Leftover
  temporary files of an interrupted write are ignored by the loader.
* Each record is one ``os.write`` of a complete line to ``metrics.jsonl`` (opened with
  ``O_APPEND``), followed by ``fsync``. A line cut short by a crash is the last one; the
  loader skips it, and any other unreadable line, with a ``RuntimeWarning``.

Records are JSON objects with an integer ``"step"``; values are numbers, strings, None,
lists and nested dicts. Non-finite floats are written as Python's ``json`` module writes
them, the tokens ``NaN``, ``Infinity`` and ``-Infinity``, which ``json.loads`` (and so
``load_run``) reads back as floats. numpy scalars and arrays and torch tensors are
converted to Python numbers and (nested) lists.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from functools import cached_property
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import torch

from . import records

__all__ = ["Curve", "DenseForecast", "KEEP_KERNELS", "Run", "RunWriter", "load_run"]

PathLike = Union[str, "os.PathLike[str]"]

KEEP_KERNELS = ("all", "log", "first_last", "none")
"""Policies for which kernels a ``RunWriter`` keeps on disk; see ``RunWriter``."""

FORMAT = "ntk_torch.run"
FORMAT_VERSION = 1
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
KERNELS_DIR = "kernels"
FORECAST_FILE = "forecast.json"
_KERNEL_FILE = re.compile(r"step_(\d+)\.npy")


def _kernel_name(step: int) -> str:
    return f"step_{step:08d}.npy"


# --------------------------------------------------------------------------- writing


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars/arrays and tensors as Python numbers/lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dumps(value: Any) -> str:
    """One-line JSON with NaN/Infinity tokens for non-finite floats."""
    return json.dumps(value, default=_jsonable, allow_nan=True, separators=(",", ":"))


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through a temporary file in its directory and ``os.replace``."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(target.parent)


def _write_line(fd: int, line: bytes) -> None:
    """Append ``line`` completely, or (on an I/O error) not at all, then fsync."""
    size = os.fstat(fd).st_size
    view = memoryview(line)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    os.fsync(fd)


def _is_power_of_two(m: int) -> bool:
    return m > 0 and m & (m - 1) == 0


def _check_step(step: Any, where: str) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"{where} must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"{where} must be >= 0, got {step}")
    return int(step)


def _prepare_directory(path: Path, overwrite: bool) -> None:
    """Create ``path``, refusing to write into anything but an empty directory or (with
    ``overwrite``) an ntk_torch run, which is deleted first."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not (path / META_FILE).is_file():
            raise FileExistsError(
                f"{path} exists, is not empty and is not an ntk_torch run; "
                "choose a new or empty run directory"
            )
        if not overwrite:
            raise FileExistsError(
                f"{path} already holds an ntk_torch run; pass overwrite=True to replace it"
            )
        try:
            _read_meta(path)
        except ValueError as error:
            raise FileExistsError(f"refusing to delete {path}: {error}") from error
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


class RunWriter:
    """Writes one run directory: metadata, one record per measurement, selected kernels.

    Args:
        path: the run directory. Created (with parents) if missing; an existing empty
            directory is used.
        meta: JSON-serialisable metadata (model, optimizer, probe set, ...), written to
            ``meta.json`` once, atomically.
        keep_kernels: which kernels ``save_kernel`` keeps on disk. With m = 0, 1, 2, ...
            counting the calls to ``save_kernel`` on this writer:

            * ``"all"``: every kernel;
            * ``"log"``: calls m = 0 and m a power of two (1, 2, 4, 8, ...), so kernels
              log-spaced in measurements (and in steps, for a regular schedule), and the
              most recent one (so the last measurement is always on disk; it replaces
              the previous most recent unless that one is log-spaced): about
              log2(M) + 3 files for M measurements;
            * ``"first_last"``: the first kernel, and the most recent one, which replaces
              the previous most recent (written before the previous is deleted);
            * ``"none"``: no kernel.
        overwrite: if ``path`` already holds an ntk_torch run, delete it and start afresh
            (otherwise that is an error). A non-empty directory that is not a run is
            never touched.

    Use as a context manager, or call ``close()``::

        with RunWriter("runs/exp", {"model": "mlp"}) as writer:
            writer.append({"step": 0, "kernel_distance": 0.0})
            writer.save_kernel(0, K)

    Raises:
        FileExistsError: ``path`` is a file, a non-empty directory that is not a run, or a
            run and ``overwrite`` is False.
        ValueError: unknown ``keep_kernels``.
        TypeError: ``meta`` is not a JSON-serialisable dict.
    """

    def __init__(
        self,
        path: PathLike,
        meta: Mapping[str, Any],
        *,
        keep_kernels: str = "log",
        overwrite: bool = False,
    ) -> None:
        if keep_kernels not in KEEP_KERNELS:
            options = ", ".join(repr(k) for k in KEEP_KERNELS)
            raise ValueError(f"keep_kernels must be one of {options}, got {keep_kernels!r}")
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        header = {"format": FORMAT, "version": FORMAT_VERSION, "keep_kernels": keep_kernels}
        try:
            encoded = _dumps({**header, "meta": dict(meta)}).encode()
        except (TypeError, ValueError) as error:
            raise TypeError(f"meta is not JSON-serialisable: {error}") from error
        self._header = {**header, "meta": dict(meta)}

        self._path = Path(path)
        self._keep_kernels = keep_kernels
        self._kernel_calls = 0
        self._last_kernel: Optional[int] = None

        _prepare_directory(self._path, overwrite)
        _atomic_write(self._path / META_FILE, lambda file: file.write(encoded))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        self._metrics_fd: Optional[int] = os.open(self._path / METRICS_FILE, flags, 0o644)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def keep_kernels(self) -> str:
        return self._keep_kernels

    @property
    def closed(self) -> bool:
        return self._metrics_fd is None

    def _require_open(self) -> None:
        if self._metrics_fd is None:
            raise ValueError(f"RunWriter for {self._path} is closed")

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line of ``metrics.jsonl``, then flush it to disk.

        Args:
            record: a dict with an int ``"step"`` (>= 0) and JSON-serialisable values:
                numbers (NaN and infinities allowed), strings, None, lists, nested dicts
                (e.g. ``{"layer_share": {"0.weight": 0.7}}``); numpy values and tensors
                are converted.
        """
        self._require_open()
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        if records.STEP not in record:
            raise ValueError("record must have a 'step' entry (the optimizer step)")
        step = _check_step(record[records.STEP], "record['step']")
        try:
            line = _dumps({**record, records.STEP: step})
        except (TypeError, ValueError) as error:
            raise TypeError(f"record at step {step} is not JSON-serialisable: {error}") from error
        _write_line(self._metrics_fd, (line + "\n").encode())

    def _keeps(self, m: int) -> bool:
        """Whether the m-th kernel stays on disk for good (not only as the latest)."""
        policy = self._keep_kernels
        if policy == "all":
            return True
        if policy == "log":
            return m == 0 or _is_power_of_two(m)
        return policy == "first_last" and m == 0

    def save_kernel(self, step: int, K: Union[torch.Tensor, np.ndarray]) -> Optional[Path]:
        """Save the kernel measured at ``step`` as ``kernels/step_{step:08d}.npy``, if the
        ``keep_kernels`` policy keeps it.

        Args:
            step: the optimizer step of the measurement, >= 0.
            K: the kernel, any shape (e.g. (N1, N2, O, O)); tensors are copied to the CPU
                only when the kernel is kept. A call that raises is not counted in m.

        Returns:
            The file written (it stays at least until the next kernel is saved), or None
            with ``keep_kernels="none"``.
        """
        self._require_open()
        step = _check_step(step, "step")
        if self._keep_kernels == "none":
            self._kernel_calls += 1
            return None

        array = _as_numpy(K)
        directory = self._path / KERNELS_DIR
        directory.mkdir(exist_ok=True)
        target = directory / _kernel_name(step)
        _atomic_write(target, lambda file: np.save(file, array, allow_pickle=False))
        permanent = self._keeps(self._kernel_calls)
        self._kernel_calls += 1

        # The latest kernel is always on disk; a previous latest that the policy does not
        # keep for good is deleted once the new one is written.
        previous, self._last_kernel = self._last_kernel, (None if permanent else step)
        if previous is not None and previous != step:
            (directory / _kernel_name(previous)).unlink(missing_ok=True)
        return target

    def update_meta(self, **fields: Any) -> None:
        """Add or replace top-level fields of the user metadata (e.g. what is known only
        once training starts); ``meta.json`` is rewritten atomically."""
        self._require_open()
        meta = {**self._header["meta"], **fields}
        try:
            encoded = _dumps({**self._header, "meta": meta}).encode()
        except (TypeError, ValueError) as error:
            raise TypeError(f"meta is not JSON-serialisable: {error}") from error
        self._header = {**self._header, "meta": meta}
        _atomic_write(self._path / META_FILE, lambda file: file.write(encoded))

    def write_forecast(self, steps: Sequence[int], fields: Mapping[str, Sequence[Optional[float]]]) -> Path:
        """Write the dense forecast, ``forecast.json``, atomically (replacing an earlier one).

        Args:
            steps: increasing optimizer steps (>= 0).
            fields: record field name (``predicted_train_loss``, ...) -> one value per
                step (a number, NaN or None).

        Returns:
            The file written.
        """
        self._require_open()
        steps = [_check_step(step, "steps[i]") for step in steps]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError("steps must be strictly increasing")
        columns = {str(name): list(values) for name, values in fields.items()}
        for name, values in columns.items():
            if len(values) != len(steps):
                raise ValueError(f"fields[{name!r}] has {len(values)} values for {len(steps)} steps")
        encoded = _dumps({"steps": steps, "fields": columns}).encode()
        target = self._path / FORECAST_FILE
        _atomic_write(target, lambda file: file.write(encoded))
        return target

    def close(self, status: Optional[str] = None) -> None:
        """Close ``metrics.jsonl``; idempotent. Everything appended is already on disk.

        Args:
            status: how the run ended, e.g. ``"completed"`` or ``"interrupted"``; written
                to ``meta.json`` (atomically) as ``"status"`` and read back as
                ``Run.status``. Ignored when the writer is already closed.
        """
        if self._metrics_fd is None:
            return
        fd, self._metrics_fd = self._metrics_fd, None
        os.close(fd)
        if status is not None:
            if not isinstance(status, str):
                raise TypeError(f"status must be a string or None, got {type(status).__name__}")
            encoded = _dumps({**self._header, "status": status}).encode()
            _atomic_write(self._path / META_FILE, lambda file: file.write(encoded))

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"RunWriter({str(self._path)!r}, keep_kernels={self._keep_kernels!r}, {state})"


def _as_numpy(K: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(K, torch.Tensor):
        K = K.detach().cpu()
        if K.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            K = K.float()
        return K.numpy()
    if isinstance(K, np.ndarray):
        if K.dtype.hasobject:
            raise TypeError("K is a numpy array of Python objects; kernels must be numeric")
        return K
    raise TypeError(f"K must be a torch.Tensor or a numpy array, got {type(K).__name__}")


# --------------------------------------------------------------------------- loading


def _read_meta(path: Path) -> Dict[str, Any]:
    """The parsed ``meta.json`` of a run, after checking it is one ntk_torch reads."""
    file = path / META_FILE
    try:
        header = json.loads(file.read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{file} was not written by ntk_torch (no \"format\": \"{FORMAT}\")")
    version = header.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{file} has format version {version!r}; this ntk_torch reads up to {FORMAT_VERSION}"
        )
    return header


def _parse_record(line: bytes) -> Dict[str, Any]:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not a record")
    step = record.get(records.STEP)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError("no integer 'step'")
    return record


def _read_records(file: Path) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The complete records of ``metrics.jsonl`` and a description of each skipped line."""
    if not file.is_file():
        return [], []
    lines = file.read_bytes().split(b"\n")
    cut_short = len(lines) - 1 if lines[-1] else None  # index of an unterminated last line
    complete, skipped = [], []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            complete.append(_parse_record(line))
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            if index == cut_short:
                skipped.append(f"line {index + 1} (incomplete last line, probably cut by a crash)")
            else:
                skipped.append(f"line {index + 1} ({error})")
    return complete, skipped


def load_run(path: PathLike) -> "Run":
    """Load a run directory written by ``RunWriter``.

    Every complete record is loaded; an unreadable line of ``metrics.jsonl`` (the last one
    cut short by a crash, or a corrupt one) is skipped with a ``RuntimeWarning`` saying
    which. Kernels are read on demand by ``Run.kernel``. Nothing is unpickled.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a run (no ``meta.json``).
        ValueError: ``meta.json`` is unreadable or not an ntk_torch run's.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an ntk_torch run directory (no {META_FILE})")
    header = _read_meta(path)
    loaded, skipped = _read_records(path / METRICS_FILE)
    if skipped:
        warnings.warn(
            f"{path / METRICS_FILE}: skipped {len(skipped)} unreadable line(s), loaded "
            f"{len(loaded)} record(s): " + "; ".join(skipped),
            RuntimeWarning,
            stacklevel=2,
        )
    return Run(
        path,
        header.get("meta", {}),
        loaded,
        keep_kernels=header.get("keep_kernels"),
        status=header.get("status"),
    )


class DenseForecast(NamedTuple):
    """A run's dense forecast (``forecast.json``): the predicted fields at many steps.

    Attributes:
        steps: int64 ``(S,)``, increasing.
        columns: record field name -> float64 ``(S,)`` (NaN where a value is missing).
    """

    steps: np.ndarray
    columns: Dict[str, np.ndarray]


def _read_forecast(path: Path) -> Optional[DenseForecast]:
    """``forecast.json`` of a run, or None when there is none or it is unreadable (with a
    ``RuntimeWarning``: the records still hold the forecast at every measurement)."""
    file = path / FORECAST_FILE
    if not file.is_file():
        return None
    try:
        content = json.loads(file.read_bytes())
        steps = np.asarray(content["steps"], dtype=np.int64)
        columns = {str(name): _column(list(values)) for name, values in content["fields"].items()}
        if steps.ndim != 1 or any(c.shape != steps.shape or c.dtype == object for c in columns.values()):
            raise ValueError("the steps and fields do not line up")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        warnings.warn(f"{file} is unreadable ({error}); using the forecast at the measurements only",
                      RuntimeWarning, stacklevel=3)
        return None
    return DenseForecast(steps, columns)


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
        path: the run directory.
        meta: the metadata dict given to ``RunWriter``.
        records: the complete records of ``metrics.jsonl``, in order, as dicts.
        keep_kernels: the kernel policy the run was written with.
        status: how the run ended as given to ``RunWriter.close`` (e.g. ``"completed"``,
            ``"interrupted"``), or None if it was not given (or the writer never closed).
    """

    def __init__(
        self,
        path: Path,
        meta: Dict[str, Any],
        records: List[Dict[str, Any]],
        *,
        keep_kernels: Optional[str] = None,
        status: Optional[str] = None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.records = records
        self.keep_kernels = keep_kernels
        self.status = status

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
        """Sorted steps with a kernel file on disk, int64."""
        directory = self.path / KERNELS_DIR
        if not directory.is_dir():
            return np.array([], dtype=np.int64)
        steps = (_KERNEL_FILE.fullmatch(entry.name) for entry in directory.iterdir())
        return np.array(sorted(int(m.group(1)) for m in steps if m), dtype=np.int64)

    def kernel(self, step: int) -> np.ndarray:
        """The kernel saved at ``step``, as written (e.g. (N1, N2, O, O)).

        Raises:
            FileNotFoundError: no kernel was kept for ``step`` (names the file and the
                steps that have one).
            ValueError: the file is not a readable ``.npy`` array.
        """
        file = self.path / KERNELS_DIR / _kernel_name(_check_step(step, "step"))
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
        tracker wrote it when it closed; None for a run without one."""
        return _read_forecast(self.path)

    def predicted_vs_actual(self) -> Dict[str, Curve]:
        """The tracker's actual and predicted loss curves: ``{split: Curve(steps, actual,
        predicted)}`` for ``"train"`` and ``"test"``, at the measurements that have both
        (empty when the run has no forecast)."""
        columns = self.metrics
        curves = {}
        for split in records.FORECAST_SPLITS:
            actual = columns.get(records.actual(split))
            predicted = columns.get(records.predicted(split))
            if actual is None or predicted is None:
                continue
            both = np.isfinite(actual) & np.isfinite(predicted)
            if both.any():
                curves[split] = Curve(self.steps[both], actual[both], predicted[both])
        return curves

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, {len(self.records)} records, "
            f"kernels at {len(self.kernel_steps)} steps)"
        )
