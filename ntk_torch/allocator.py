"""How this process's CPU memory is handed out: two settings that keep a kernel's large
transients from being faulted in afresh on every call, and what each costs.

A structured kernel call makes and frees tensors of tens of megabytes (a CNN's per-example
gradients and cotangents). glibc maps every allocation of 32 MB or more (smaller ones too
while its adaptive threshold is low) with fresh pages and gives freed memory at the top of
its heap back to the system, so each call has the kernel fault its transients in again,
4 KB at a time and zeroed: on the development VM about 2 us a fault, 55,000 faults and
100 ms of a 300-470 ms CNN kernel. JAX and XLA keep their own pool and pay this once.

* Huge pages (:func:`prefer_huge_pages`, ``THP_MEM_ALLOC_ENABLE=1`` before torch loads):
  torch places every tensor of 2 MB or more on transparent huge pages, faulted 2 MB at a
  time (still zeroed): 10x fewer faults, most of the time back, no more memory. The
  ``ntk-torch`` command sets it for itself unless the variable is set.
* Keeping freed memory (:func:`keep_freed_memory`): glibc serves every allocation from its
  heap and keeps what is freed (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD,
  2 GiB)``): after the first few calls a kernel faults nothing (CNN kernels of the README
  20-30% faster than by default). It takes effect at once, for the whole process, and
  changes no result. The cost is memory: resident memory stays near its peak between
  calls, and glibc's heap fragments (glibc before 2.38 does not place torch's 64-byte-
  aligned tensors in freed blocks of exactly their size): the README's ``digits_mlp`` run
  peaks at the same 564 MB, a CNN kernel at 514 MB instead of 481 MB, but a ``full``-mode
  tracker with a forecast at 1,334 MB instead of 944 MB. The kernels' default memory budget
  counts what the heap holds free as available (:func:`free_heap_bytes`). Opt in with
  one call before training, or ``NTK_TORCH_KEEP_FREED_MEMORY=1`` for the command.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from platform import libc_ver
from typing import Any, Callable, Optional

__all__ = [
    "HUGE_PAGES", "KEEP_FREED_MEMORY", "describe", "free_heap_bytes", "keep_for_command", "keep_freed_memory",
    "prefer_huge_pages",
]

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's switch for transparent huge pages in its CPU allocator (read once, at torch's
first allocation: it must be set before torch loads)."""
KEEP_FREED_MEMORY = "NTK_TORCH_KEEP_FREED_MEMORY"
"""The environment variable with which a user has the ``ntk-torch`` command keep freed memory (``1``)."""

# mallopt's parameters (glibc's malloc.h) and the defaults that ``enabled=False`` restores.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free heap top kept

_kept = False


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[Any]:
    """The C library when it is glibc (on Linux), else None; looked up once (every kernel
    call's default memory budget reads :func:`free_heap_bytes`)."""
    if not sys.platform.startswith("linux") or libc_ver()[0] != "glibc":
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


def prefer_huge_pages(environ: Any = os.environ, modules: Any = sys.modules,
                      platform: str = sys.platform) -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` for this process and its children unless the user set
    it (``=0`` keeps torch's default) or torch is loaded already (it would not read it);
    Linux only. Whether it was set."""
    if HUGE_PAGES in environ or "torch" in modules or not platform.startswith("linux"):
        return False
    environ[HUGE_PAGES] = "1"
    return True


def keep_for_command(environ: Any = os.environ, libc: Optional[Callable[[], Optional[Any]]] = None) -> bool:
    """:func:`keep_freed_memory` for the ``ntk-torch`` command when the user set
    ``NTK_TORCH_KEEP_FREED_MEMORY=1``; whether it was turned on.

    Raises:
        ValueError: the variable is set to anything but ``0`` or ``1``.
    """
    value = environ.get(KEEP_FREED_MEMORY, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{KEEP_FREED_MEMORY} must be 0 or 1, got {value!r}")
    return value == "1" and keep_freed_memory(libc=libc)


def describe(environ: Any = os.environ) -> str:
    """This process's settings, for benchmark headers."""
    kept = ("glibc keeps freed memory (ntk_torch.keep_freed_memory)" if _kept
            else "glibc returns freed memory to the system")
    return f"{kept}; {HUGE_PAGES}={environ.get(HUGE_PAGES, 'unset')}"
