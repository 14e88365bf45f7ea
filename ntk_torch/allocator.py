"""How this process's CPU memory is handed out: the setting that keeps a kernel's large
transients from being faulted in afresh on every call.

A structured kernel call makes and frees tensors of tens of megabytes (a CNN's per-example
gradients and cotangents). glibc maps every allocation of 32 MB or more (smaller ones too
while its adaptive threshold is low) with fresh pages and gives freed memory at the top of
its heap back to the system, so each call has the kernel fault its transients in again,
4 KB at a time and zeroed: on the development VM about 2 us a fault, 55,000 faults and
100 ms of a 300-470 ms CNN kernel. JAX and XLA keep their own pool and pay this once.

:func:`keep_freed_memory` asks glibc to serve every allocation from its heap and to keep
what is freed (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB)``): after the
first few calls a kernel faults nothing (CNN kernels of the README 20-25% faster). It takes
effect at once, for the whole process, and changes no result. The cost: resident memory
stays near its peak instead of falling back between calls, and while the heap settles it
can grow past the peak (glibc before 2.38 does not place torch's 64-byte-aligned tensors
in freed blocks of exactly their size; a loop of one 64 MB tensor settles at five). On the
README's runs the peak is unchanged (CNN kernel: 514 MB kept vs 481 MB; ``ntk-torch run
configs/digits_mlp.yaml``: 564 vs 562 MB) and flat over calls. Up to 2 GiB of free heap top
is kept, more is returned; the kernels' default memory budget counts what the heap holds
free as available (:func:`free_heap_bytes`), which the system's count leaves out. The
``ntk-torch`` command turns it on for itself
(:func:`keep_for_command`) unless ``NTK_TORCH_KEEP_FREED_MEMORY=0``; a script calls it once,
before training.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Any, Callable, Optional

__all__ = ["KEEP_FREED_MEMORY", "describe", "free_heap_bytes", "keep_for_command", "keep_freed_memory"]

KEEP_FREED_MEMORY = "NTK_TORCH_KEEP_FREED_MEMORY"
"""The environment variable with which a user turns the ``ntk-torch`` command's setting off (``0``)."""

# mallopt's parameters (glibc's malloc.h) and the defaults that ``enabled=False`` restores.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free heap top kept

_kept = False


def _glibc() -> Optional[Any]:
    """The C library when it is glibc (on Linux), else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def keep_freed_memory(enabled: bool = True, *, libc: Optional[Callable[[], Optional[Any]]] = None) -> bool:
    """Have glibc keep freed memory for reuse (``enabled``), or restore its defaults and
    return what it holds to the system (``enabled=False``; glibc's threshold for mapping
    allocations afresh then stays at 128 KB instead of adapting). Whether the setting
    applies: glibc on Linux only (elsewhere nothing changes and this returns False).

    Args:
        enabled: keep freed memory (True) or go back to glibc's defaults (False).
        libc: the C library to configure (tests); default this process's glibc.

    Raises:
        TypeError: ``enabled`` is not a bool.
        OSError: glibc refused a setting (``mallopt`` returned 0).
    """
    global _kept
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    library = (libc or _glibc)()
    if library is None:
        return False
    mmap_max, trim = (0, _KEPT_TRIM_THRESHOLD) if enabled else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    for parameter, value, name in ((_M_MMAP_MAX, mmap_max, "M_MMAP_MAX"), (_M_TRIM_THRESHOLD, trim, "M_TRIM_THRESHOLD")):
        if library.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc's mallopt refused {name}={value}")
    if not enabled:
        library.malloc_trim(ctypes.c_size_t(0))
    _kept = enabled
    return True


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later): every field a ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_heap_bytes(libc: Optional[Callable[[], Optional[Any]]] = None) -> int:
    """Bytes glibc holds free in its heaps (``mallinfo2().fordblks``): memory this process
    can allocate again without the system, which the system's free-memory count leaves
    out. While freed memory is kept it can be most of a past kernel's peak; with glibc's
    defaults it is small. 0 where the C library is not glibc 2.33 or later."""
    library = (libc or _glibc)()
    mallinfo2 = getattr(library, "mallinfo2", None) if library is not None else None
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def keep_for_command(environ: Any = os.environ, libc: Optional[Callable[[], Optional[Any]]] = None) -> bool:
    """:func:`keep_freed_memory` for the ``ntk-torch`` command, unless the user set
    ``NTK_TORCH_KEEP_FREED_MEMORY=0``; whether it was turned on.

    Raises:
        ValueError: the variable is set to anything but ``0`` or ``1``.
    """
    value = environ.get(KEEP_FREED_MEMORY, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{KEEP_FREED_MEMORY} must be 0 or 1, got {value!r}")
    return value == "1" and keep_freed_memory(libc=libc)


def describe() -> str:
    """This process's setting, for benchmark headers."""
    return ("glibc keeps freed memory (ntk_torch.keep_freed_memory)" if _kept
            else "default (freed memory returned to the system)")
