"""``RunWriter``: one run directory written append-only, created for itself race-free."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .. import records
from .._options import check_bool
from .background import BackgroundWrite
from .files import (
    FORMAT,
    FORECAST_FILE,
    FORMAT_VERSION,
    KERNELS_DIR,
    META_FILE,
    METRICS_FILE,
    PathLike,
    atomic_write,
    claim_file,
    kernel_name,
    open_new_for_append,
    resolve,
    write_line,
)
from .reading import MAX_STEP, read_meta
from .summary import FinalValues, write_summary

__all__ = ["KEEP_KERNELS", "RunWriter"]

KEEP_KERNELS = ("all", "log", "first_last", "none")
"""Policies for which kernels a ``RunWriter`` keeps on disk; see ``RunWriter``."""


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


def _is_power_of_two(m: int) -> bool:
    return m > 0 and m & (m - 1) == 0


def check_step(step: Any, where: str) -> int:
    """``step`` as an int in ``[0, MAX_STEP)``, or a ``TypeError``/``ValueError`` naming ``where``."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"{where} must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"{where} must be >= 0, got {step}")
    if step >= MAX_STEP:
        raise ValueError(f"{where} must be below 2**53 (steps are read back as float64 too), got {step}")
    return int(step)


def _make_directory(path: Path) -> None:
    """Create ``path`` (parents as needed); an empty directory that exists already is used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not path.is_dir() or any(path.iterdir()):
            raise FileExistsError(f"{path} was created by someone else meanwhile; choose another run directory") from None


def _prepare_directory(path: Path, overwrite: bool) -> None:
    """Make ``path`` an empty directory, refusing anything but a missing or empty directory
    or (with ``overwrite``) an ntk_torch run, which is deleted first. The writer then
    claims it by creating ``meta.json`` exclusively (:func:`~.files.claim_file`)."""
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
            read_meta(path)
        except ValueError as error:
            raise FileExistsError(f"refusing to delete {path}: {error}") from error
        shutil.rmtree(path)
    _make_directory(path)


class RunWriter:
    """Writes one run directory: metadata, one record per measurement, selected kernels.

    Args:
        path: the run directory, resolved first (``..`` and symbolic links followed).
            Created (with parents) if missing; an existing empty directory is used.
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
            never touched. Must be a bool.
        background: write kernels on a background thread (:mod:`.background`): the same
            atomic replace, one write in flight, waited for by the next ``save_kernel``,
            :meth:`flush` and :meth:`close` (which raise its error, if any). Must be a bool.

    The directory is taken race-free: ``meta.json`` is created exclusively (a hard link
    of a complete temporary file, which fails if the file exists), so of two writers
    started on one directory at once exactly one succeeds and the other raises
    ``FileExistsError``; records are never mixed into another writer's run.

    Use as a context manager, or call ``close()``::

        with RunWriter("runs/exp", {"model": "mlp"}) as writer:
            writer.append({"step": 0, "kernel_distance": 0.0})
            writer.save_kernel(0, K)

    Raises:
        FileExistsError: ``path`` is a file, a non-empty directory that is not a run, or a
            run and ``overwrite`` is False, or another writer claimed it first.
        ValueError: unknown ``keep_kernels``.
        TypeError: ``meta`` is not a JSON-serialisable dict, or ``overwrite`` not a bool.
    """

    def __init__(
        self,
        path: PathLike,
        meta: Mapping[str, Any],
        *,
        keep_kernels: str = "log",
        overwrite: bool = False,
        background: bool = False,
    ) -> None:
        if keep_kernels not in KEEP_KERNELS:
            options = ", ".join(repr(k) for k in KEEP_KERNELS)
            raise ValueError(f"keep_kernels must be one of {options}, got {keep_kernels!r}")
        check_bool("overwrite", overwrite)
        check_bool("background", background)
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        header = {"format": FORMAT, "version": FORMAT_VERSION, "keep_kernels": keep_kernels}
        try:
            encoded = _dumps({**header, "meta": dict(meta)}).encode()
        except (TypeError, ValueError) as error:
            raise TypeError(f"meta is not JSON-serialisable: {error}") from error
        self._header = {**header, "meta": dict(meta)}

        self._path = resolve(path)
        self._keep_kernels = keep_kernels
        self._kernel_calls = 0
        self._last_kernel: Optional[int] = None
        self._final = FinalValues()
        self._background = background
        self._pending: Optional[BackgroundWrite] = None

        _prepare_directory(self._path, overwrite)
        try:
            claim_file(self._path / META_FILE, encoded)
        except FileExistsError:
            raise FileExistsError(
                f"{self._path} was claimed by another writer meanwhile; choose another run directory"
            ) from None
        self._metrics_fd: Optional[int] = open_new_for_append(self._path / METRICS_FILE)

    @property
    def path(self) -> Path:
        """The run directory, resolved."""
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
            record: a dict with an int ``"step"`` (0 <= step < 2**53) and
                JSON-serialisable values: numbers (NaN and infinities allowed), strings,
                None, lists, nested dicts (e.g. ``{"layer_share": {"0.weight": 0.7}}``);
                numpy values and tensors are converted.
        """
        self._require_open()
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        if records.STEP not in record:
            raise ValueError("record must have a 'step' entry (the optimizer step)")
        step = check_step(record[records.STEP], "record['step']")
        try:
            line = _dumps({**record, records.STEP: step})
        except (TypeError, ValueError) as error:
            raise TypeError(f"record at step {step} is not JSON-serialisable: {error}") from error
        write_line(self._metrics_fd, (line + "\n").encode())
        self._final.add(json.loads(line))

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
            The file written (it stays at least until the next kernel is saved; with
            ``background=True`` it is complete once the next ``save_kernel``, ``flush`` or
            ``close`` returns), or None with ``keep_kernels="none"``.
        """
        self._require_open()
        step = check_step(step, "step")
        if self._keep_kernels == "none":
            self._kernel_calls += 1
            return None

        array = _as_numpy(K)
        if self._background:
            self.flush()  # one write in flight: memory stays bounded, errors surface here
            array = np.array(array, copy=True)  # the caller may reuse K meanwhile
        directory = self._path / KERNELS_DIR
        directory.mkdir(exist_ok=True)
        target = directory / kernel_name(step)
        permanent = self._keeps(self._kernel_calls)
        # The latest kernel is always on disk; a previous latest that the policy does not
        # keep for good is deleted once the new one is written.
        previous = self._last_kernel
        stale = directory / kernel_name(previous) if previous is not None and previous != step else None

        def write() -> None:
            atomic_write(target, lambda file: np.save(file, array, allow_pickle=False))
            if stale is not None:
                stale.unlink(missing_ok=True)

        if self._background:
            self._pending = BackgroundWrite(write)
        else:
            write()
        self._kernel_calls += 1
        self._last_kernel = None if permanent else step
        return target

    def flush(self) -> None:
        """Wait for a kernel being written in the background; raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

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
        atomic_write(self._path / META_FILE, lambda file: file.write(encoded))

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
        steps = [check_step(step, "steps[i]") for step in steps]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError("steps must be strictly increasing")
        columns = {str(name): list(values) for name, values in fields.items()}
        for name, values in columns.items():
            if len(values) != len(steps):
                raise ValueError(f"fields[{name!r}] has {len(values)} values for {len(steps)} steps")
        encoded = _dumps({"steps": steps, "fields": columns}).encode()
        target = self._path / FORECAST_FILE
        atomic_write(target, lambda file: file.write(encoded))
        return target

    def close(self, status: Optional[str] = None, *, reason: Optional[str] = None) -> None:
        """Close ``metrics.jsonl`` and write ``summary.json`` (the last finite value of
        every numeric field, the configuration, the versions; see
        :mod:`ntk_torch.runs.summary`); idempotent. Everything appended is already on disk.

        Args:
            status: how the run ended, e.g. ``"completed"``, ``"interrupted"`` or
                ``"failed"``; written to ``meta.json`` (atomically) as ``"status"`` and read
                back as ``Run.status``. Ignored when the writer is already closed.
            reason: why, in one line (e.g. the exception that ended the run); written as
                ``"reason"`` and read back as ``Run.reason``.
        """
        if self._metrics_fd is None:
            return
        try:
            self.flush()
        finally:
            self._close(status, reason)

    def _close(self, status: Optional[str], reason: Optional[str]) -> None:
        for name, value in (("status", status), ("reason", reason)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {type(value).__name__}")
        fd, self._metrics_fd = self._metrics_fd, None
        os.close(fd)
        if status is not None:
            ending = {"status": status, **({"reason": reason} if reason is not None else {})}
            encoded = _dumps({**self._header, **ending}).encode()
            atomic_write(self._path / META_FILE, lambda file: file.write(encoded))
        write_summary(self._path, self._header["meta"], self._final, status, reason, default=_jsonable)

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
