"""A kernel written to a memory-mapped ``.npy`` file tile by tile, with a progress record.

``empirical_ntk(..., out="kernel.npy")`` never holds the kernel in memory. Beside the
kernel file ``F`` it keeps:

* ``F.partial``: the kernel while it is being written, a ``.npy`` file of the final dtype
  and shape (created with ``numpy.lib.format.open_memmap``); renamed to ``F`` once every
  tile is in it, so ``F`` exists only when it is complete;
* ``F.progress.json``: the progress record, owned by rank 0 and replaced atomically: its
  ``status`` (``"partial"``, then ``"complete"``), the request's fingerprint
  (:mod:`.fingerprint`: weights, inputs, mode, dtype, shape, method, ...) and the tiling
  (block size, memory budget, number of block pairs);
* ``F.tiles``: one byte per block pair, 1 once the pair's entries are on disk; each rank
  sets its own pairs' bytes. Removed when the kernel is complete.

Each tile is written through memory maps of the rows it lies in (and of its mirror's rows
for ``x2=None``), a few rows at a time so that at most about :data:`MAP_BYTES` of file
pages are mapped at once (the file's pages do not add up in the process's memory). Every
:data:`SYNC_SECONDS`, at the end and when the computation is interrupted, the file is
flushed to disk (``fsync``) and only then are the tiles written since marked in
``F.tiles``: a pair marked done is on disk. An interruption loses at most the tiles in flight; with
``resume=True`` the computation continues with the recorded tiling and memory budget,
computes only the pairs not marked, and gives the identical file. A record that does not
match the request, or that is unreadable, is refused (:class:`KernelStoreError`) and
nothing is written. Several ranks may write into one kernel file only on one machine
(they share its page cache); :mod:`.execution` checks this.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import KernelStoreError
from ..layout import Layout
from .fingerprint import differences
from .tiling import BlockPair

FORMAT = "ntk_torch kernel progress"
VERSION = 1
PARTIAL, COMPLETE = "partial", "complete"
SYNC_SECONDS = 2.0
"""How often written tiles are flushed to disk and marked done (at most the work an
interruption can lose, besides the tiles in flight)."""
MAP_BYTES = 1 << 20
"""About the most file pages one tile write keeps mapped (and resident) at a time."""
NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


class KernelStore:
    """The files of one out-of-core kernel ``path`` (see the module docstring)."""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.record_path = self.path.with_name(self.path.name + ".progress.json")
        self.tiles_path = self.path.with_name(self.path.name + ".tiles")
        self._offset: Optional[int] = None
        self._unsynced: List[int] = []
        self._synced_at = time.monotonic()

    # ------------------------------------------------------------------ rank 0: the record

    def inspect(self, resume: bool) -> Optional[Dict[str, Any]]:
        """The existing progress record, checked for consistency with the files, or None
        when there is nothing to continue.

        Raises:
            FileExistsError: a kernel or progress record is there and ``resume`` is False.
            KernelStoreError: the record is unreadable or disagrees with the files.
        """
        present = [p for p in (self.path, self.partial, self.record_path, self.tiles_path) if p.exists()]
        if not resume:
            if present:
                raise FileExistsError(
                    f"out={str(self.path)!r}: {present[0]} already exists; pass resume=True to continue or reuse "
                    "it, or delete it (and its .partial, .progress.json and .tiles files) to start again"
                )
            return None
        if not self.record_path.exists():
            if present:
                raise KernelStoreError(
                    f"out={str(self.path)!r}: {present[0]} exists without its progress record {self.record_path}; "
                    "refusing to continue or overwrite it: delete it or choose another out"
                )
            return None
        record = self._read_record()
        self._check_files(record)
        return record

    def _corrupt(self, why: str) -> KernelStoreError:
        return KernelStoreError(
            f"the progress record {self.record_path} is corrupt ({why}); refusing to continue: delete "
            f"{self.path.name}.partial, .progress.json and .tiles to start again"
        )

    def _read_record(self) -> Dict[str, Any]:
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._corrupt(f"unreadable: {error}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise self._corrupt("not an ntk_torch progress record")
        if record.get("version") != VERSION:
            raise self._corrupt(f"version {record.get('version')!r}, this ntk_torch reads {VERSION}")
        tiling = record.get("tiling")
        if (record.get("status") not in (PARTIAL, COMPLETE) or not isinstance(record.get("fingerprint"), dict)
                or not isinstance(tiling, dict) or not all(isinstance(tiling.get(k), int) and tiling[k] > 0
                                                           for k in ("block_size", "memory_budget", "pairs"))):
            raise self._corrupt("missing or invalid status, fingerprint or tiling")
        return record

    def _check_files(self, record: Dict[str, Any]) -> None:
        """The kernel file (final once complete, else partial) has the recorded shape and
        dtype, and ``.tiles`` one flag per pair while partial."""
        fingerprint = record["fingerprint"]
        complete = record["status"] == COMPLETE or (self.path.exists() and not self.partial.exists())
        kernel = self.path if complete else self.partial
        try:
            array = np.load(kernel, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise self._corrupt(f"{kernel.name} is missing or not a .npy file: {error}") from None
        if list(array.shape) != fingerprint.get("shape") or array.dtype.name != fingerprint.get("dtype"):
            raise self._corrupt(f"{kernel.name} holds {array.dtype.name} {list(array.shape)}, the record says "
                                f"{fingerprint.get('dtype')} {fingerprint.get('shape')}")
        del array
        if complete:
            return
        flags = self.tiles_path.read_bytes() if self.tiles_path.exists() else None
        if flags is None or len(flags) != record["tiling"]["pairs"] or set(flags) - {0, 1}:
            raise self._corrupt(f"{self.tiles_path.name} is missing or does not hold one 0/1 flag per block pair")

    def check(self, record: Dict[str, Any], fingerprint: Dict[str, Any]) -> None:
        """Refuse a record made for another request, naming what differs."""
        differ = differences(fingerprint, record["fingerprint"])
        if differ:
            listed = "; ".join(f"{key}: {found!r} here, {stored!r} in the record" for key, (found, stored) in differ.items())
            raise KernelStoreError(
                f"out={str(self.path)!r} was started for another request ({listed}); refusing to mix kernels: "
                "delete its files or choose another out"
            )

    def complete(self, record: Optional[Dict[str, Any]]) -> bool:
        """Whether ``record`` is of a finished kernel (its file renamed into place)."""
        return record is not None and self.path.exists() and not self.partial.exists()

    def create(self, fingerprint: Dict[str, Any], tiling: Dict[str, int], dtype: torch.dtype) -> None:
        """A fresh partial kernel file, no tiles done, and the record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=NUMPY_DTYPES[dtype],
                                          shape=tuple(fingerprint["shape"]))
        del array
        self.tiles_path.write_bytes(bytes(tiling["pairs"]))
        self._write_record({"format": FORMAT, "version": VERSION, "status": PARTIAL, "kernel": self.path.name,
                            "fingerprint": fingerprint, "tiling": tiling})

    def _write_record(self, record: Dict[str, Any]) -> None:
        temporary = self.record_path.with_name(self.record_path.name + ".tmp")
        with open(temporary, "w") as file:
            json.dump(record, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.record_path)

    def done(self) -> List[int]:
        """The indices of the pairs marked done."""
        return [index for index, flag in enumerate(self.tiles_path.read_bytes()) if flag]

    def finish(self) -> None:
        """Check every pair is done, rename the kernel into place and record it complete."""
        record = self._read_record()
        missing = record["tiling"]["pairs"] - len(self.done())
        if missing:
            raise RuntimeError(f"{missing} block pairs of {self.partial} are not marked done")
        os.replace(self.partial, self.path)
        self._write_record({**record, "status": COMPLETE})
        self.tiles_path.unlink()

    # ------------------------------------------------------------------ every rank: tiles

    def _data_offset(self) -> int:
        if self._offset is None:
            array = np.load(self.partial, mmap_mode="r")
            self._offset = int(array.offset)
            del array
        return self._offset

    def _write_band(self, rows: tuple, cols: tuple, values: np.ndarray, shape: tuple, dtype: Any) -> None:
        """``kernel[rows, cols] = values`` through maps of at most about :data:`MAP_BYTES`
        of touched pages at a time, each unmapped once written."""
        (r0, r1), (c0, c1) = rows, cols
        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        segment = (c1 - c0) * row_bytes // max(shape[1], 1)
        step = max(1, MAP_BYTES // (segment + 2 * mmap.PAGESIZE))
        for start in range(r0, r1, step):
            stop = min(start + step, r1)
            band = np.memmap(self.partial, dtype=dtype, mode="r+", offset=self._data_offset() + start * row_bytes,
                             shape=(stop - start,) + tuple(shape[1:]))
            band[:, c0:c1] = values[start - r0:stop - r0]
            del band  # unmapped; its dirty pages stay in the page cache until synced

    def write(self, layout: Layout, pair: BlockPair, block: torch.Tensor, shape: tuple) -> None:
        """Put one pair's block (and its mirror) in the file; it is marked done at the next
        :meth:`sync`, which runs when :data:`SYNC_SECONDS` have passed since the last."""
        dtype = NUMPY_DTYPES[block.dtype]
        self._write_band(pair.rows, pair.cols, block.cpu().numpy(), shape, dtype)
        if pair.mirrored:
            self._write_band(pair.cols, pair.rows, layout.transpose(block).cpu().numpy(), shape, dtype)
        self._unsynced.append(pair.index)
        if time.monotonic() - self._synced_at >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """Flush the kernel file to disk (``fsync``), then mark the pairs written since
        the last sync done: a pair marked done is on disk."""
        if self._unsynced:
            descriptor = os.open(self.partial, os.O_RDWR)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            descriptor = os.open(self.tiles_path, os.O_WRONLY)
            try:
                for index in self._unsynced:
                    os.pwrite(descriptor, b"\x01", index)
            finally:
                os.close(descriptor)
            self._unsynced = []
        self._synced_at = time.monotonic()

    def result(self) -> torch.Tensor:
        """The finished kernel as a CPU tensor over a copy-on-write map of the file: read
        from disk as it is used; writes to it stay in memory."""
        return torch.from_numpy(np.load(self.path, mmap_mode="c"))
