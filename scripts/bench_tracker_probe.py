"""What each probe kernel of NTKTracker costs per measurement, and how far its drift lies
from the dense kernel's.

The workload of the README's "Large probe sets" example: the digits MLP 64-256-10
(PyTorch's default initialisation, seed 0), one epoch of minibatch-64 SGD (lr 0.1) over
the 1437 training images, measured every 10 steps on a probe of ``--probe-size`` images,
for each probe kernel: dense ``trace`` and ``pntk``, ``sketch=256``, and
``kernel="estimate"`` in ``trace`` and ``pntk`` mode.

    python scripts/bench_tracker_probe.py [--probe-size 256] [--threads 1] [--matvecs 60]

Prints a markdown table: machine, torch version, threads, and per probe kernel the median
seconds per measurement (the probe's loss included), the relative change at the last
step (with its estimated error for the estimators) and its distance from the dense
kernel's of the same mode. About 50 s with the defaults on one CPU thread.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from typing import Any, Dict, List, Optional

import torch

import ntk_torch as ntk

KERNELS = (
    ("dense trace", {}),
    ("dense pntk", {"mode": "pntk"}),
    ("sketch=256 (trace)", {"sketch": 256}),
    ("estimate (trace)", {"kernel": "estimate"}),
    ("estimate (pntk)", {"kernel": "estimate", "mode": "pntk"}),
)


def tracked(options: Dict[str, Any], probe_size: int) -> List[Dict[str, Any]]:
    """The records of one tracked epoch with the probe kernel ``options``."""
    split = ntk.data.digits()
    x, y = split.train
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = ntk.NTKTracker(model, split.train, probe_size=probe_size, every=10, forecast=None, progress=False,
                             **options)
    with tracker.attach(optimizer):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return tracker.records


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--matvecs", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for label, options in KERNELS:
        if options.get("kernel") == "estimate":
            options = {**options, "matvecs": args.matvecs}
        results[label] = tracked(options, args.probe_size)
    print(f"machine: {platform.machine()} {platform.processor() or platform.system()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), probe {args.probe_size} digits images, matvecs {args.matvecs}\n")
    print("| probe kernel | s per measurement (median) | relative change at the last step | from the dense kernel's |")
    print("|---|---:|---:|---:|")
    for label, _ in KERNELS:
        records = results[label]
        last = records[-1]
        dense = results["dense pntk" if "pntk" in label else "dense trace"][-1]["relative_change"]
        error = last.get("relative_change_error")
        change = f"{last['relative_change']:.4f}" + ("" if error is None else f" ± {error:.1e}")
        seconds = statistics.median(r["measure_time"] for r in records)
        print(f"| {label} | {seconds:.3g} | {change} (step {last['step']}) | {abs(last['relative_change'] - dense):.1e} |")


if __name__ == "__main__":
    main()
