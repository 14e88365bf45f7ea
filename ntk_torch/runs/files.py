"""The files of a run directory: names, paths, permissions and crash-safe writes.

* **Paths** are resolved (``Path.resolve``: symbolic links and ``..`` followed, as the
  operating system would) before anything is checked, so ``"new/../existing"`` is
  ``existing`` to every check, not a fresh directory.
* **Permissions**: every file and directory of a run is created with mode 0o666 (0o777
  for directories) masked by the user's umask, as any file the user creates (0o644 and
  0o755 under the usual umask 022). Nothing is created private with ``mkstemp``'s 0o600.
* **Atomic writes**: a file is written to a temporary file in the same directory
  (``.<name>.<random>.tmp``), fsynced, then moved into place with ``os.replace``; a
  reader sees the old file or the new one, never a mix. :func:`claim_file` instead links
  the temporary file into place, which fails if the target exists: that is how a writer
  takes a directory for itself, race-free.
* **Appends**: :func:`write_line` writes one complete line with ``os.write`` and fsyncs.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "ntk_torch.run"
FORMAT_VERSION = 1
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
KERNELS_DIR = "kernels"
FORECAST_FILE = "forecast.json"
KERNEL_FILE = re.compile(r"step_(\d+)\.npy")
FILE_MODE = 0o666
"""The mode every run file is created with, before the umask."""


def kernel_name(step: int) -> str:
    return f"step_{step:08d}.npy"


def resolve(path: PathLike, name: str = "path") -> Path:
    """``path`` made absolute with symbolic links and ``..`` resolved (the directory need
    not exist)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    if isinstance(path, str) and not path:
        raise ValueError(f"{name} is an empty string; give a directory")
    return Path(path).resolve()


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(target: Path, write: Callable[[BinaryIO], None]) -> Path:
    """A new file beside ``target`` (mode 0o666 under the umask) holding what ``write``
    wrote, fsynced; removed again if writing fails."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temporary, flags, FILE_MODE)
            break
        except FileExistsError:  # a name another write is using: draw again
            continue
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return temporary


def atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through a temporary file in its directory and ``os.replace``."""
    temporary = _temporary(target, write)
    try:
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_directory(target.parent)


def claim_file(target: Path, content: bytes) -> None:
    """Create ``target`` holding ``content``, atomically and only if it does not exist.

    Raises:
        FileExistsError: ``target`` exists (another writer got there first).
    """
    temporary = _temporary(target, lambda file: file.write(content))
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: exclusive creation, written in place
        _create_exclusively(target, content)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    fsync_directory(target.parent)


def _create_exclusively(target: Path, content: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(target, flags, FILE_MODE)
    with os.fdopen(fd, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def open_new_for_append(target: Path) -> int:
    """A descriptor appending to ``target``, which must not exist yet."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(target, flags, FILE_MODE)


def write_line(fd: int, line: bytes) -> None:
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
