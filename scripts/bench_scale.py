"""Beyond the dense kernel: exact vs pNTK vs sketched kernels, and eigsh at large N.

    python scripts/bench_scale.py [--quick] [--n 256] [--threads N] [--eigsh-n 10000 50000]
                                  [--only kernels|eigsh] [--sketches 256 1024 4096]

Part 1, for the digits MLP (64-256-256-10) and the shared-zoo CNN (``cnn_bn``) and
Transformer (``tests/zoo.py``), on ``--n`` inputs: the exact full kernel, the pNTK and
sketched full kernels (d = 256, 1024, 4096), each with its time, its peak memory (CUDA
allocation on a GPU; on CPU the peak resident set above the one at the row's start), the
relative Frobenius error against the exact full kernel (the pNTK read as ``K_pntk (x) I``,
Mohamadi et al. 2023) and the largest relative error of its top-10 eigenvalues. Each is an
``NTK`` built once, timed after an untimed call on two examples (the first call analyses
the model: a one-off cost).

Part 2: ``ntk_torch.eigsh`` top-10 of the digits MLP's trace kernel (an ``NTKOperator``,
never formed) at each ``--eigsh-n`` on generated standard-normal 64-dim inputs (the digits
set has only 1,797 images), with time, products used (block Lanczos, blocks of 10), peak
memory and the largest relative residual (``--eigsh-tol``, default 1e-6: eigenvalue errors
about its square). A dense float64 kernel at N = 50,000 would need 20 GB.

``--quick``: N = 48, d = 256 and 1024, eigsh at N = 2,000 only (a minute on a laptop).
``--only`` runs one part (the eigsh rows at large N take the longest: run them on their own).
Prints a markdown table with the machine, torch version, threads and load average.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ntk_torch  # noqa: E402
from bench_ntk import _status_bytes  # noqa: E402
from ntk_torch.functional import slice_inputs  # noqa: E402
from zoo import make_zoo  # noqa: E402


def digits_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cases(n: int) -> Dict[str, Tuple[nn.Module, object, object]]:
    """``{name: (model, inputs, output_fn)}``."""
    zoo = make_zoo()
    g = torch.Generator().manual_seed(0)
    out = {"digits MLP": (digits_mlp(), torch.randn(n, 64, generator=g), None)}
    for key, label in (("cnn_bn", "zoo CNN"), ("transformer", "zoo Transformer")):
        case = zoo[key]
        out[label] = (case.model, case.make_inputs(n, 0), case.output_fn)
    return out


class Peak:
    """Peak memory of a block: the CUDA peak allocation on a GPU; on CPU the peak resident
    set during the block above the resident set at its start (Linux resets the high-water
    mark through ``/proc/self/clear_refs``; elsewhere the growth of ``ru_maxrss``)."""

    def __enter__(self) -> "Peak":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.base = _reset_peak_rss()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        if torch.cuda.is_available():
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = _peak_rss() - self.base


def _reset_peak_rss() -> int:
    """Return freed heap to the OS (glibc), then reset the peak-RSS mark to the current RSS
    where the OS allows (so memory reused from earlier rows counts); the baseline bytes."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    else:
        rss = _status_bytes("VmRSS")
        if rss is not None:
            return rss
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def full_matrix(K: torch.Tensor) -> torch.Tensor:
    n1, n2, o, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o).double()


def errors(approx: torch.Tensor, exact: torch.Tensor) -> Tuple[float, float]:
    """Relative Frobenius error and the largest relative error of the top-10 eigenvalues."""
    kernel = float((approx - exact).norm() / exact.norm())
    top_a = torch.linalg.eigvalsh(approx).flip(0)[:10]
    top_e = torch.linalg.eigvalsh(exact).flip(0)[:10]
    return kernel, float(((top_a - top_e).abs() / top_e.abs()).max())


def timed(kernel: ntk_torch.NTK, x) -> Tuple[torch.Tensor, "Peak"]:
    """``kernel(x)`` timed after an untimed call on two examples (the first call analyses
    the model and builds its plan, kept by the ``NTK``: a one-off cost, not the kernel's)."""
    kernel(slice_inputs(x, 0, 2))
    with Peak() as p:
        K = kernel(x)
    return K, p


def kernel_rows(n: int, sketches: List[int], device: torch.device) -> List[List[str]]:
    rows = []
    for name, (model, x, output_fn) in cases(n).items():
        model = model.to(device)
        x = x.to(device) if isinstance(x, torch.Tensor) else x
        ntk = partial(ntk_torch.NTK, model, output_fn=output_fn)
        exact, p = timed(ntk(mode="full"), x)
        exact = full_matrix(exact)
        o = exact.shape[0] // n
        rows.append([name, "exact (full)", f"{p.seconds:.3f}", _mb(p.bytes), "0", "0"])
        pntk, p = timed(ntk(mode="pntk"), x)
        lifted = torch.kron(pntk.double(), torch.eye(o, dtype=torch.float64))
        rows.append([name, "pNTK (x) I", f"{p.seconds:.3f}", _mb(p.bytes), *(f"{e:.3g}" for e in errors(lifted, exact))])
        for d in sketches:
            sk, p = timed(ntk(mode="full", sketch=d), x)
            rows.append([name, f"sketch d={d}", f"{p.seconds:.3f}", _mb(p.bytes),
                         *(f"{e:.3g}" for e in errors(full_matrix(sk), exact))])
    return rows


def eigsh_rows(sizes: List[int], device: torch.device, tol: float) -> List[List[str]]:
    rows = []
    model = digits_mlp().to(device)
    for n in sizes:
        x = torch.randn(n, 64, generator=torch.Generator().manual_seed(1)).to(device)
        with Peak() as p:
            op = ntk_torch.NTKOperator(model, x, mode="trace")
            result = ntk_torch.eigsh(op, k=10, tol=tol)
        top = ", ".join(f"{v:.4g}" for v in result.eigenvalues[:3].tolist())
        residual = float(result.residuals.max() / result.eigenvalues[0])
        rows.append([f"N={n}", f"{p.seconds:.1f}", str(result.iterations), _mb(p.bytes), f"{residual:.1e}", top])
    return rows


def _mb(value: int) -> str:
    return f"{max(value, 0) / 2**20:.1f}"


def header(threads: int) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return (f"machine: {platform.node()} ({device}, {os.cpu_count()} CPUs); torch {torch.__version__}; "
            f"threads {threads}; load average {load}")


def table(columns: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--eigsh-n", type=int, nargs="*", default=[10_000, 50_000])
    parser.add_argument("--eigsh-tol", type=float, default=1e-6,
                        help="relative residual of the Ritz pairs (eigenvalue errors about its square)")
    parser.add_argument("--sketches", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--only", choices=("kernels", "eigsh"), default=None, help="run one part of the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, sketches, sizes = (48, [256, 1024], [2_000]) if args.quick else (args.n, args.sketches, args.eigsh_n)
    print(header(args.threads) + "\n")
    if args.only != "eigsh":
        print(table(["model", "kernel", "time (s)", "memory (MB)", "rel. error K", "rel. error top-10"],
                    kernel_rows(n, sketches, device)))
        print()
    if args.only == "kernels":
        return
    print(table(["eigsh top-10, trace kernel (digits MLP, generated 64-dim inputs)", "time (s)", "products",
                 "peak memory (MB)", "max residual / lambda_1", "top eigenvalues"],
                eigsh_rows(sizes, device, args.eigsh_tol)))


if __name__ == "__main__":
    main()
