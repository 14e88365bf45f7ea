"""Scaling of the trace kernel: time and peak memory against N and against width.

The MLP ``784-w-w-10`` (``w`` = 512 unless varied), ``x2=None``, ``mode="trace"``,
``method="auto"`` (the structured engine) under ``memory_budget="1GB"``. Every point runs
in a fresh process (so that its peak resident memory is its own), twice: pinned
to one core with one thread (``taskset -c 0``, ``torch.set_num_threads(1)``) and with every
thread. Peak memory is the extra over the process's resident set before the kernel
(``VmHWM`` minus ``VmRSS``). The exponents are least-squares slopes of ``log seconds`` (and ``log peak MB``)
against ``log N`` or ``log w``: about 2 in N for the kernel's ``N^2`` entries, about 2 in
width for its ``w^2`` per-layer products once they dominate.

    python scripts/bench_scaling.py            # N = 1k..16k at w=512, w = 128..1024 at N=2k
    python scripts/bench_scaling.py --quick    # N = 256..1k, w = 64..256 at N=256

Prints a markdown table (machine, torch, threads, load average in the header).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

FULL_N = (1024, 2048, 4096, 8192, 16384)
FULL_WIDTHS = (128, 256, 512, 1024)
QUICK_N = (256, 512, 1024)
QUICK_WIDTHS = (64, 128, 256)


def child(n: int, width: int, threads: int) -> None:
    """In a fresh process: one warm-up at N=64, then the timed trace kernel; prints JSON."""
    import torch
    from torch import nn

    from ntk_torch import empirical_ntk

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    x = torch.randn(n, 784)
    empirical_ntk(model, x[:64], mode="trace", memory_budget="1GB")
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    empirical_ntk(model, x, mode="trace", memory_budget="1GB")
    seconds = time.perf_counter() - start
    # Peak extra memory: the process's high-water mark over its resident set before the
    # kernel (the torch import and the warm-up are not the kernel's).
    extra = max(_status_bytes("VmHWM") - before, 0)
    print(json.dumps({"seconds": seconds, "peak_rss": extra, "threads": torch.get_num_threads()}))


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_point(n: int, width: int, pinned: bool) -> Optional[Dict[str, float]]:
    """One point in a subprocess; None if it failed."""
    command = [sys.executable, __file__, "--child", str(n), str(width), "1" if pinned else "0"]
    if pinned and shutil.which("taskset"):
        command = ["taskset", "-c", "0"] + command
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"N={n} w={width}: failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def exponent(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of ``log y`` against ``log x`` (None with fewer than 2 points)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def sweep(points: Sequence[Tuple[int, int]], variable: int) -> Tuple[List[str], List[str]]:
    """Table rows and fitted-exponent lines for ``points`` ``(N, w)``; ``variable`` 0 for N, 1 for w."""
    rows, fits = [], []
    results = {label: [run_point(n, w, pinned) for n, w in points] for label, pinned in (("1", True), ("all", False))}
    for i, (n, w) in enumerate(points):
        cells = []
        for label in ("1", "all"):
            r = results[label][i]
            cells += ["–", "–"] if r is None else [f"{r['seconds']:.3f}", f"{r['peak_rss'] / 1e6:,.0f}"]
        rows.append(f"| {n} | {w} | " + " | ".join(cells) + " |")
    name = "N" if variable == 0 else "width"
    for label, title in (("1", "1 thread pinned"), ("all", "all threads")):
        ok = [(p[variable], r) for p, r in zip(points, results[label]) if r is not None]
        t = exponent([x for x, _ in ok], [r["seconds"] for _, r in ok])
        m = exponent([x for x, _ in ok], [r["peak_rss"] for _, r in ok])
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        fits.append(f"- against {name}, {title}: time ~ {name}^{fmt(t)}, peak memory ~ {name}^{fmt(m)}")
    return rows, fits


def header() -> List[str]:
    import torch

    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"threads: 1 pinned (taskset -c 0) | all ({torch.get_num_threads()}); load average {load}",
        "",
        "| N | width | s (1 thread) | peak extra MB (1 thread) | s (all threads) | peak extra MB (all threads) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N and widths (a minute)")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    ns, widths = (QUICK_N, QUICK_WIDTHS) if args.quick else (FULL_N, FULL_WIDTHS)
    fixed_n = 256 if args.quick else 2048
    lines = header()
    rows_n, fits_n = sweep([(n, 512) for n in ns], 0)
    rows_w, fits_w = sweep([(fixed_n, w) for w in widths], 1)
    lines += rows_n + rows_w + [""] + fits_n + fits_w
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
