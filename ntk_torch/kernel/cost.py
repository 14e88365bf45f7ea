"""Memory budgets and the cost model that picks an engine.

The cost model follows Novak, Sohl-Dickstein & Schoenholz 2022 ("Fast finite width neural
tangent kernel", Table 1). With ``F`` the FLOPs of one forward pass of one example, ``P``
parameters and ``O`` outputs:

* Jacobian contraction: the Jacobians cost about ``N O (3 F)`` (one forward, ``O``
  backward passes of about ``2 F`` each, vectorised); the contraction costs
  ``2 N1 N2 O^2 P`` in ``full`` mode and ``2 N1 N2 O P`` in ``trace``/``diagonal`` mode.
* NTK-vector products: ``N2 O`` vector-Jacobian products give the columns' tangents
  (about ``N2 O 3 F``), then each of the ``N2 O`` tangents costs one Jacobian-vector
  product over the ``N1`` rows (about ``3 F`` per example): ``3 N1 N2 O F``; twice that
  where the columns are reverse-over-reverse products (no usable forward mode).
* The loop engine does the Jacobian engine's arithmetic one example and one output at a
  time, without ``vmap``: the same FLOPs (it is only a candidate where ``vmap`` fails).

With ``x2=None`` only the upper block triangle is computed, which halves the pairwise
terms. ``F`` is measured once with :class:`torch.utils.flop_counter.FlopCounterMode`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..allocator import free_heap_bytes
from ..functional import FunctionalModel, Inputs
from ..layout import Layout

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

DEFAULT_CPU_FRACTION = 0.25
DEFAULT_CUDA_FRACTION = 0.5
FALLBACK_BUDGET = 2 * 10**9


def parse_memory(value: Union[int, float, str], name: str = "memory_budget") -> int:
    """Bytes from an int/float or a string such as ``"2GB"``, ``"512 MiB"`` or ``"1.5e9"``.

    ``KB``/``MB``/``GB`` are powers of 10, ``KiB``/``MiB``/``GiB`` powers of 2.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '2GB', got a bool")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name}={value!r} is not a memory size; expected bytes or a string like "
                "'2GB', '512MB' or '1GiB'"
            )
        number = float(match.group(1)) * _UNITS[unit]
    else:
        raise TypeError(
            f"{name} must be a number of bytes or a string like '2GB', got {type(value).__name__}"
        )
    if not number > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number of bytes, got {value!r}")
    return int(number)


def available_memory(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` in bytes, or ``None`` when it cannot be read. On the host:
    the system's available memory plus what this process's allocator holds free for reuse
    (:func:`ntk_torch.allocator.free_heap_bytes`; with ``keep_freed_memory`` a past
    kernel's transients stay there, not in the system's count)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    system = _system_available_memory()
    return None if system is None else system + free_heap_bytes()


def _system_available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the free host memory on CPU, half the free device memory on CUDA."""
    free = available_memory(device)
    if free is None:
        return FALLBACK_BUDGET
    fraction = DEFAULT_CUDA_FRACTION if device.type == "cuda" else DEFAULT_CPU_FRACTION
    return max(int(free * fraction), 1)


@dataclass(frozen=True)
class ForwardProfile:
    """What one forward pass of one example costs.

    Attributes:
        flops: matmul/convolution FLOPs counted by ``FlopCounterMode`` (at least ``2 P``).
        activation_bytes: bytes autograd saves for the backward pass, excluding parameters
            and buffers (shared by all examples); at least the output.
        num_params: P.
        num_outputs: O.
        itemsize: bytes per element of the compute dtype.
    """

    flops: int
    activation_bytes: int
    num_params: int
    num_outputs: int
    itemsize: int


def profile_forward(fmodel: FunctionalModel, x_one: Inputs, num_outputs: int) -> ForwardProfile:
    """Measure :class:`ForwardProfile` on a batch of one example ``x_one``."""
    saved = [0]
    params = {n: p.detach().requires_grad_(True) for n, p in fmodel.params.items()}
    # Parameters and buffers saved for backward are shared by all examples: not activations.
    shared = {t.untyped_storage().data_ptr() for t in (*params.values(), *fmodel.constants.values())}

    def pack(t: torch.Tensor) -> None:
        # Count, and keep nothing: holding ``t`` here would tie it to its own graph in a
        # reference cycle that Python's garbage collector cannot see.
        if t.untyped_storage().data_ptr() not in shared:
            saved[0] += t.numel() * t.element_size()

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("profile_forward's graph is for measurement only")

    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter, torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        fmodel(params, x_one)
    itemsize = torch.empty((), dtype=fmodel.dtype).element_size()
    num_params = fmodel.num_params
    return ForwardProfile(
        flops=max(int(counter.get_total_flops()), 2 * num_params),
        activation_bytes=max(saved[0], num_outputs * itemsize),
        num_params=num_params,
        num_outputs=num_outputs,
        itemsize=itemsize,
    )


def jacobian_cost(profile: ForwardProfile, layout: Layout, n1: int, n2: int, symmetric: bool) -> float:
    """Estimated FLOPs of Jacobian contraction (see the module docstring)."""
    o, p, f = profile.num_outputs, profile.num_params, profile.flops
    examples = n1 if symmetric else n1 + n2
    pairs = n1 * n2 / (2 if symmetric else 1)
    contraction = 2 * pairs * p * layout.output_pairs(o)
    return examples * o * 3 * f + contraction


def ntk_vp_cost(
    profile: ForwardProfile, layout: Layout, n1: int, n2: int, symmetric: bool, reverse_products: bool = False
) -> float:
    """Estimated FLOPs of NTK-vector products (see the module docstring)."""
    o, f = profile.num_outputs, profile.flops
    pairs = n1 * n2 / (2 if symmetric else 1)
    columns = (6 if reverse_products else 3) * pairs * o * f
    return n2 * o * 3 * f + columns


def loop_cost(profile: ForwardProfile, layout: Layout, n1: int, n2: int, symmetric: bool) -> float:
    """Estimated FLOPs of the loop engine: those of Jacobian contraction."""
    return jacobian_cost(profile, layout, n1, n2, symmetric)
