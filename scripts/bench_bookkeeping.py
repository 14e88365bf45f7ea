"""NTKTracker's bookkeeping per measurement in every layout, one markdown table.

    python scripts/bench_bookkeeping.py [--quick] [--epochs 4]

The workload is ``scripts/bench_tracker.py``'s: the digits MLP 64-256-256-10, a probe of
256 images, a measurement every 10 steps, no forecast. For ``mode`` ``trace``,
``diagonal`` and ``full`` (and ``full`` with ``spectrum="full"``, the whole spectrum of
its 2560 x 2560 matrix, side by side with the default's top ten), each setting in a fresh
process pinned to CPU 0 with one thread and then with every thread, it reads from the
records (medians over the measurements after step 0):

* ``kernel``: ``kernel_time``, forming the probe kernel;
* ``bookkeeping``: ``measure_time - kernel_time``, and its share of the kernel;
* of which ``fields``: the kernel's record fields (``KernelDrift.fields``: statistics,
  spectrum, alignment, drift), timed around the call; ``rest`` is the losses on the probe
  and test sets, the parameter distance and the record's writing.

The header names the machine, torch, the threads and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = (("trace", "auto"), ("diagonal", "auto"), ("full", "auto"), ("full", "full"))
"""(mode, spectrum) of each row."""


def measure(mode: str, spectrum: str, epochs: int) -> Dict[str, float]:
    """Medians over one tracked run's measurements after step 0 (the first run of the
    process is a warm-up: allocator, engine choice), in seconds."""
    from bench_tracker import digits, make_optimizer, mlp, train

    from ntk_torch.tracker import NTKTracker

    train_set, test_set = digits()
    for _ in range(2):
        model = mlp(seed=0)
        optimizer = make_optimizer("sgd", model)
        with tempfile.TemporaryDirectory() as directory:
            tracker = NTKTracker(model, train_set, test=test_set, probe_size=256, every=10, mode=mode,
                                 spectrum=spectrum, run_dir=Path(directory) / "run", progress=False, forecast=None)
            fields_seconds: List[float] = []
            drift = tracker._kernel.drift
            compute = drift.fields

            def timed(step, kernels, compute=compute, seconds=fields_seconds):
                started = time.perf_counter()
                result = compute(step, kernels)
                seconds.append(time.perf_counter() - started)
                return result

            drift.fields = timed
            with tracker.attach(optimizer):
                train(model, optimizer, train_set, epochs)
            records = tracker.records[1:]
            fields_seconds = fields_seconds[1:len(records) + 1]
    bookkeeping = [r["measure_time"] - r["kernel_time"] for r in records]
    return {"kernel": statistics.median(r["kernel_time"] for r in records),
            "bookkeeping": statistics.median(bookkeeping), "fields": statistics.median(fields_seconds),
            "measurements": len(records)}


def child(threads: int, epochs: int) -> None:
    """In a fresh process: every case at ``threads`` threads (0: torch's default), as one JSON line."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, HERE)
    out = {f"{mode}/{spectrum}": measure(mode, spectrum, epochs) for mode, spectrum in CASES}
    print(json.dumps({"threads": torch.get_num_threads(), "cases": out}))


def setting(pinned: bool, epochs: int) -> dict:
    """One setting's figures from a fresh process (pinned: ``taskset -c 0``, one thread)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", "1" if pinned else "0", str(epochs)]
    if pinned:
        command = ["taskset", "-c", "0"] + command
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(settings: Dict[str, dict]) -> List[str]:
    """The markdown table: one row per case and setting."""
    lines = ["| mode | spectrum | threads | kernel (ms) | bookkeeping (ms) | share of the kernel "
             "| of which fields (ms) | rest (ms) | measurements |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, spectrum in CASES:
        for label, measured in settings.items():
            c = measured["cases"][f"{mode}/{spectrum}"]
            lines.append(f"| {mode} | {spectrum} | {label} | {1e3 * c['kernel']:.1f} | {1e3 * c['bookkeeping']:.1f} "
                         f"| {100 * c['bookkeeping'] / c['kernel']:.0f}% | {1e3 * c['fields']:.1f} "
                         f"| {1e3 * (c['bookkeeping'] - c['fields']):.1f} | {c['measurements']} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4,
                        help="training epochs per run (about 23 steps each; 4: ten measurements, most in the steady state)")
    parser.add_argument("--quick", action="store_true", help="one epoch")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)
    if args.child:
        child(int(args.child[0]), int(args.child[1]))
        return 0
    if args.epochs < 1:
        raise SystemExit("error: --epochs must be at least 1")
    import torch

    from bench_ntk import load_average, machine_description

    epochs = 1 if args.quick else args.epochs
    started, before = time.perf_counter(), load_average()
    settings = {}
    for pinned in (True, False):
        measured = setting(pinned, epochs)
        settings["1 (taskset -c 0)" if pinned else f"all ({measured['threads']})"] = measured
    print(f"Machine: {machine_description(torch.device('cpu'))} (before: {before}; after: {load_average()}); "
          f"torch {torch.__version__}; digits MLP 64-256-256-10, probe 256, every 10 steps, {epochs} epoch(s); "
          f"{time.perf_counter() - started:.0f} s in all")
    print()
    print("\n".join(table(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
