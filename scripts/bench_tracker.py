"""How much NTKTracker adds to the wall time of a realistic training loop.

The workload of the tracker's overhead target: an MLP 64-256-256-10 trained on
scikit-learn's digits (standardised, 80/20 split) with minibatch-64 SGD (momentum 0.9)
for a few epochs, tracked with a 256-example probe every 10 optimizer steps in trace mode
(``method="auto"``), writing a run directory. Plain and tracked runs alternate, each
``--repeats`` times, from the same seeds; the table reports medians.

    python scripts/bench_tracker.py [--epochs 5] [--repeats 3] [--threads N] [--forecast auto|kernel|twin|none]
                                    [--optimizer sgd|adam] [--observe]
    python scripts/bench_tracker.py --twin-step [--repeats 200]

Prints a markdown table: machine, torch version, threads, training time with and without
the tracker, the overhead in percent, and the time per measurement with its kernel part.

``--twin-step`` measures the linearised twin's cost instead: one Adam training step of
the MLP on a minibatch of 64 against one step of its twin on the same batch (what the
tracker adds to every optimizer step with the twin forecast), and the twin's evaluation
on the 1437 training and 360 test images (what it adds to a measurement), side by side
with one thread pinned to one core and with all threads.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ntk_torch import empirical_ntk
from ntk_torch.losses import resolve
from ntk_torch.probe import LabelledSet
from ntk_torch.tracker import NTKTracker
from ntk_torch.twin import LinearisedTwin

Split = Tuple[torch.Tensor, torch.Tensor]


def digits() -> Tuple[Split, Split]:
    """Standardised digits (train statistics), a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Split, epochs: int,
          tracker: "NTKTracker | None" = None) -> int:
    """Minibatch-64 epochs over shuffled data (each batch shown to ``tracker`` when
    given); returns the number of steps."""
    x, y = data
    generator = torch.Generator().manual_seed(1)
    steps = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            if tracker is not None:
                tracker.observe(x[batch], y[batch])
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            steps += 1
    return steps


def run(args: argparse.Namespace, train_set: Split, test_set: Split, tracked: bool) -> Dict[str, float]:
    """One training run, timed from the tracker's creation (if any) to its close."""
    model = mlp(seed=0)
    optimizer = make_optimizer(args.optimizer, model)
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        if tracked:
            tracker = NTKTracker(
                model, train_set, test=test_set, probe_size=args.probe_size, every=args.every,
                mode="trace", method=args.method, run_dir=Path(directory) / "run", progress=False,
                forecast=None if args.forecast == "none" else args.forecast,
            )
            with tracker.attach(optimizer):
                steps = train(model, optimizer, train_set, args.epochs, tracker if args.observe else None)
        else:
            steps = train(model, optimizer, train_set, args.epochs)
        seconds = time.perf_counter() - started
    result = {"seconds": seconds, "steps": steps}
    if tracked:
        times = [record["measure_time"] for record in tracker.records]
        result.update(measurements=len(times), measure=statistics.median(times), drift=tracker.records[-1]["relative_change"],
                      forecast=tracker.forecast.kind if tracker.forecast is not None else "none")
    return result


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _alternating_seconds(works: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, List[float]]:
    """Each of ``works`` timed ``repeats`` times, taking turns (so that a busy machine
    slows them alike), after a warm-up."""
    for work in works.values():
        for _ in range(3):
            work()
    times: Dict[str, List[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            started = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - started)
    return times


def twin_costs(train_set: Split, test_set: Split, repeats: int) -> Dict[str, float]:
    """Median seconds of a training step, the twin's step on the same minibatch, and the
    twin's evaluation on the training and test sets (a measurement's part)."""
    model = mlp(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train_set
    loss = resolve("cross_entropy")
    twin = LinearisedTwin(model=model, optimizer=optimizer, points=LabelledSet(x, y), test=LabelledSet(*test_set),
                          loss=loss, output_fn=None, approximate_points=False)
    twin.batches = "minibatch"
    batch = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))[:64]
    xb, yb = x[batch], y[batch]

    def training_step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()

    step = 0

    def evaluation() -> None:
        nonlocal step
        step += 1
        twin.at(-step)  # a step never asked before: evaluated, not cached

    steps = _alternating_seconds(
        {"training": training_step, "twin": lambda: twin.step([(xb, yb)], follow=optimizer)}, repeats)
    evaluations = _alternating_seconds({"evaluation": evaluation}, max(5, repeats // 20))
    return {
        "training": statistics.median(steps["training"]),
        "twin": statistics.median(steps["twin"]),
        "ratio": statistics.median(t / s for t, s in zip(steps["twin"], steps["training"])),
        "evaluation": statistics.median(evaluations["evaluation"]),
    }


def twin_table(args: argparse.Namespace, train_set: Split, test_set: Split) -> None:
    """The twin's costs with one thread pinned to one core, and with all threads."""
    rows = []
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    for label, pinned in (("1 thread, pinned to one core", True), (f"{threads} threads", False)):
        if affinity is not None:
            os.sched_setaffinity(0, {min(affinity)} if pinned else affinity)
        torch.set_num_threads(1 if pinned else threads)
        costs = twin_costs(train_set, test_set, args.repeats)
        rows.append((label, costs))
    torch.set_num_threads(threads)
    print(f"| quantity (median of {args.repeats}) | " + " | ".join(label for label, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    print(f"| machine | {machine()} |" + " |" * (len(rows) - 1))
    print(f"| torch | {torch.__version__} |" + " |" * (len(rows) - 1))
    print("| workload | digits MLP 64-256-256-10, Adam, minibatch 64 |" + " |" * (len(rows) - 1))
    for name, key in (("training step", "training"), ("twin step (jvp + backward + Adam)", "twin")):
        print(f"| {name} | " + " | ".join(f"{1e3 * c[key]:.2f} ms" for _, c in rows) + " |")
    print("| twin step / training step (median of the pairs) | "
          + " | ".join(f"{c['ratio']:.2f}x" for _, c in rows) + " |")
    print("| twin evaluation, 1437 train + 360 test images | "
          + " | ".join(f"{1e3 * c['evaluation']:.1f} ms" for _, c in rows) + " |")


def kernel_seconds(args: argparse.Namespace, train_set: Split, repeats: int = 5) -> float:
    """Median time of the probe kernel alone (per layer, as the tracker computes it)."""
    model, probe = mlp(seed=0), train_set[0][: args.probe_size]
    empirical_ntk(model, probe, mode="trace", method=args.method, per_layer=True)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        empirical_ntk(model, probe, mode="trace", method=args.method, per_layer=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--forecast", choices=("auto", "kernel", "twin", "none"), default="auto",
                        help="the tracker's forecast (none: the kernel drift only)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--observe", action="store_true", help="show the tracker each minibatch")
    parser.add_argument("--twin-step", action="store_true",
                        help="time the twin's step against a training step instead (see the module docstring)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    train_set, test_set = digits()
    if args.twin_step:
        twin_table(args, train_set, test_set)
        return
    run(args, train_set, test_set, tracked=True)  # warm-up: allocator, engine choice
    plain: List[Dict[str, float]] = []
    tracked: List[Dict[str, float]] = []
    for _ in range(args.repeats):  # alternate, so that load changes hit both alike
        plain.append(run(args, train_set, test_set, tracked=False))
        tracked.append(run(args, train_set, test_set, tracked=True))

    t_plain = statistics.median(r["seconds"] for r in plain)
    t_tracked = statistics.median(r["seconds"] for r in tracked)
    measure = statistics.median(r["measure"] for r in tracked)
    kernel = kernel_seconds(args, train_set)
    last = tracked[-1]
    rows = [
        ("machine", machine()),
        ("torch", torch.__version__),
        ("threads", str(torch.get_num_threads())),
        ("workload", f"digits MLP 64-256-256-10, batch 64 {args.optimizer}, {args.epochs} epochs = "
                     f"{last['steps']} steps{', batches observed' if args.observe else ''}"),
        ("tracking", f"probe {args.probe_size}, every {args.every}, trace, method={args.method!r}, "
                     f"{last['measurements']} measurements, forecast {args.forecast} ({last['forecast']})"),
        ("training without tracker", f"{t_plain:.3f} s ({1e3 * t_plain / last['steps']:.2f} ms/step)"),
        ("training with tracker", f"{t_tracked:.3f} s"),
        ("overhead", f"{100 * (t_tracked - t_plain) / t_plain:.1f} %"),
        ("per measurement", f"{1e3 * measure:.1f} ms (kernel alone {1e3 * kernel:.1f} ms)"),
        ("bookkeeping / kernel per measurement", f"{1e3 * (measure - kernel):.1f} ms / {1e3 * kernel:.1f} ms = "
                                                 f"{100 * (measure - kernel) / kernel:.0f} % (goal <= 15 %)"),
        ("every for 25 % overhead", f"~{math.ceil(measure / (0.25 * t_plain / last['steps']))} steps"),
        ("final relative kernel change", f"{last['drift']:.4f}"),
    ]
    print(f"| quantity | value (median of {args.repeats}) |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
