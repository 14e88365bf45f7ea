"""Every performance goal of the benchmark issue in one run, one markdown table.

    python scripts/bench_goals.py --nt-python /tmp/nt-venv/bin/python [--quick] [--repeats 3] [--rounds 3]

Each setting runs in fresh processes: pinned to CPU 0 (``taskset -c 0``) with one thread
(``torch.set_num_threads(1)``; XLA's one-thread flags for neural-tangents), then with every
thread. The kernels are timed in ``--rounds`` alternating rounds (ours, then
neural-tangents'): each side's median over rounds gives the ratio, and the cell shows the
range of the rounds' own ratios, since a shared machine's pace swings by 2x within
minutes. Per setting it measures, side by side:

* the structured engine against neural-tangents' structured derivatives
  (``scripts/bench_nt.py`` in its own environment) on the MLP 784-512-512-10 at N=128 and
  the CNN 3x16x16 conv32-conv64-fc10 at N=64 of ``scripts/bench_ntk.py``, ``full`` and
  ``trace``, ``x2=None`` (goals: MLP >= 1.5x, CNN >= 2.5x); ours an ``NTK`` built once and
  called, as neural-tangents' ``kernel_fn`` is jitted once (first calls untimed);
* the structured engine's achieved GFLOP/s on the MLP against ``torch.matmul``'s in the same
  process (goal: >= 80%). The FLOPs are *counted*, not the cost model's estimate: the
  forward pass, the cotangents of every layer's output (one backward pass per output
  through every Linear but the first), half of each layer's feature and cotangent Gram
  products (``x2=None``) and their Hadamard accumulation -- the work any method that forms
  the per-layer Grams must do;
* the torch.func tutorial's Jacobian contraction against ``method="auto"`` on the MLP
  ``trace`` (goal: the tutorial >= 300x slower);
* NTKTracker's bookkeeping per measurement (``measure_time`` minus ``kernel_time``, the
  probe kernel timed inside the same measurement) over the kernel's time, on
  ``scripts/bench_tracker.py``'s digits MLP with a 256-example probe, trace mode, every 10
  steps, no forecast (goal: <= 15%).

``--quick``: one timed call per entry and one training epoch. ``--allocator`` sets the
torch processes' memory up (:mod:`ntk_torch.allocator`): ``default`` (glibc's and torch's
defaults), ``huge-pages`` (``THP_MEM_ALLOC_ENABLE=1``, what the ``ntk-torch`` command sets:
transparent huge pages for every tensor of 2 MB or more) or ``keep``
(:func:`ntk_torch.keep_freed_memory`: freed memory kept for reuse, so that a kernel call
faults no page in, at a cost in memory); neural-tangents' processes are unchanged (XLA
keeps its own pool). Under ``ntk-torch bench --goals`` the torch processes also inherit
the command's ``THP_MEM_ALLOC_ENABLE=1``. The header names the machine, torch, the threads,
the allocator setting (an inherited ``THP_MEM_ALLOC_ENABLE`` too) and the load average
before and after (figures measured under load are provisional).
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
from typing import Dict, List, Optional, Sequence, Tuple

from ntk_torch.allocator import HUGE_PAGES as THP  # stdlib only: torch is not loaded here

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("mlp/full", "mlp/trace", "cnn/full", "cnn/trace")
SIZES = {"mlp": 128, "cnn": 64}
GOAL_VS_NT = {"mlp": 1.5, "cnn": 2.5}


def mlp_counted_flops(model, n: int, mode: str) -> float:
    """The necessary FLOPs of the ``n x n`` symmetric kernel of an MLP of ``nn.Linear``
    layers (see the module docstring): forward ``2 n sum d_in d_out``; cotangents
    ``2 n O sum_{l>1} d_in d_out``; per layer half of the feature Gram ``2 n^2 (d_in + 1)``
    and of the cotangent Gram ``2 (n O)^2 d_out`` (``full``) or ``2 n^2 O d_out``
    (``trace``), and the Hadamard accumulation (``n^2 O^2`` or ``n^2`` multiply-adds)."""
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    o = linears[-1].out_features
    forward = 2.0 * n * sum(m.in_features * m.out_features for m in linears)
    cotangents = 2.0 * n * o * sum(m.in_features * m.out_features for m in linears[1:])
    pairs = o * o if mode == "full" else 1
    grams = 0.0
    for m in linears:
        feature = 2.0 * n * n * (m.in_features + 1)
        cotangent = 2.0 * n * n * (o * o if mode == "full" else o) * m.out_features
        grams += feature + cotangent + 2.0 * n * n * pairs
    return forward + cotangents + grams / 2


def matmul_rate(repeats: int = 10) -> float:
    """``torch.matmul``'s FLOP/s here (1280x512 @ 512x1280, median of ``repeats``)."""
    import torch

    from bench_ntk import time_call

    a, b = torch.randn(1280, 512), torch.randn(512, 1280)
    return 2.0 * 1280 * 512 * 1280 / time_call(lambda: a @ b, torch.device("cpu"), 3, repeats)


def tracker_fraction(epochs: int) -> Dict[str, float]:
    """The tracker's bookkeeping on a digits run: medians over its measurements of
    ``measure_time - kernel_time`` and of ``kernel_time`` (seconds), both read from the same
    records (the kernel timed inside the measurement, not in a separate run)."""
    import torch

    from bench_tracker import digits, make_optimizer, mlp, train
    from ntk_torch.tracker import NTKTracker

    train_set, test_set = digits()
    records: List[dict] = []
    for _ in range(2):  # the first run warms the allocator and the engine choice
        model = mlp(seed=0)
        optimizer = make_optimizer("sgd", model)
        with tempfile.TemporaryDirectory() as directory:
            tracker = NTKTracker(model, train_set, test=test_set, probe_size=256, every=10, mode="trace",
                                 method="auto", run_dir=Path(directory) / "run", progress=False, forecast=None)
            with tracker.attach(optimizer):
                train(model, optimizer, train_set, epochs)
            records = [r for r in tracker.records if r["step"] > 0]  # step 0 also plans the engine
    return {"bookkeeping": statistics.median(r["measure_time"] - r["kernel_time"] for r in records),
            "kernel": statistics.median(r["kernel_time"] for r in records), "measurements": len(records),
            "threads": torch.get_num_threads()}


def child(repeats: int, threads: int, epochs: int, allocator: str, part: str = "kernels") -> None:
    """In a fresh process: the torch-side figures of one setting, as one JSON line:
    ``part="kernels"`` the four structured kernels, ``torch.matmul``'s rate and the counted
    FLOPs (one round, see :func:`main`); ``"rest"`` the tutorial against ``auto`` and the
    tracker's bookkeeping."""
    import torch

    sys.path.insert(0, HERE)
    from bench_ntk import cnn_case, mlp_case, time_call, tutorial_baseline

    from ntk_torch import NTK, keep_freed_memory

    if allocator == "keep" and not keep_freed_memory():
        raise SystemExit("--allocator keep needs glibc (Linux)")

    if threads:
        torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    out: Dict[str, object] = {"threads": torch.get_num_threads()}
    mlp = mlp_case()
    if part == "kernels":
        cases = {"mlp": mlp, "cnn": cnn_case()}
        out["seconds"] = {}
        for key in KEYS:
            case, mode = cases[key.split("/")[0]], key.split("/")[1]
            kernel = NTK(case.model, mode=mode, method="structured")  # built once, like NT's jitted kernel_fn
            out["seconds"][key] = time_call(lambda: kernel(case.inputs), cpu, 1, repeats)
        out["matmul"] = matmul_rate()
        out["flops"] = {mode: mlp_counted_flops(mlp.model, SIZES["mlp"], mode) for mode in ("full", "trace")}
    else:
        auto = NTK(mlp.model, mode="trace", method="auto")
        out["auto_trace"] = time_call(lambda: auto(mlp.inputs), cpu, 1, repeats)
        out["tutorial_trace"] = time_call(lambda: tutorial_baseline(mlp.model, mlp.inputs, mlp.inputs, "trace"),
                                          cpu, 0, 1)
        out["tracker"] = tracker_fraction(epochs)
    print(json.dumps(out))


ALLOCATORS = {
    "default": "default (glibc's and torch's)",
    "keep": "keep (ntk_torch.keep_freed_memory: freed memory kept for reuse)",
    "huge-pages": "huge pages (THP_MEM_ALLOC_ENABLE=1, tensors >= 2 MB)",
}
"""``--allocator`` choices and how the header names them."""
HUGE_PAGES = {THP: "1"}
"""The environment of the torch processes under ``--allocator huge-pages`` (torch reads it
once, at its first allocation: it must be set before the process starts)."""


def torch_setting(repeats: int, pinned: bool, epochs: int, allocator: str = "default", part: str = "kernels") -> dict:
    from bench_vs_nt import _pinned

    command = [sys.executable, __file__, "--child", str(repeats), "1" if pinned else "0", str(epochs), allocator,
               part]
    env = {**os.environ, **HUGE_PAGES} if allocator == "huge-pages" else None
    done = subprocess.run(_pinned(command, pinned), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"torch run failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    """The median, or None if any value is missing (a side that did not run)."""
    return None if any(v is None for v in values) else statistics.median(values)


def combine_rounds(measured: Sequence[Tuple[dict, Dict[str, Optional[float]]]]) -> dict:
    """Our figures over rounds: median seconds per kernel and matmul rate, and each round's
    ratio to neural-tangents (``ratios[key]``, None where it did not run)."""
    first = measured[0][0]
    return {
        "threads": first["threads"], "flops": first["flops"],
        "seconds": {key: statistics.median(ours["seconds"][key] for ours, _ in measured) for key in KEYS},
        "matmul": statistics.median(ours["matmul"] for ours, _ in measured),
        "ratios": {key: [None if nt.get(key) is None else nt[key] / ours["seconds"][key] for ours, nt in measured]
                   for key in KEYS},
    }


def _ratio(value: Optional[float], goal: float, fmt: str = "{:.2f}x") -> str:
    if value is None:
        return "–"
    return fmt.format(value) + (" ✓" if value >= goal else " ✗")


def table(settings: Dict[str, Tuple[dict, Dict[str, Optional[float]]]]) -> List[str]:
    """The goals table: one row per goal, a value column per setting."""
    labels = list(settings)
    lines = ["| goal | target | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]

    def row(name: str, target: str, cells: Sequence[str]) -> None:
        lines.append(f"| {name} | {target} | " + " | ".join(cells) + " |")

    for key in KEYS:
        case, mode = key.split("/")
        cells = []
        for label in labels:
            ours, nt = settings[label]
            seconds = ours["seconds"][key]
            theirs = nt.get(key)
            ratio = None if theirs is None else theirs / seconds
            spread = [r for r in ours.get("ratios", {}).get(key, []) if r is not None]
            rounds = f" (rounds {min(spread):.2f}-{max(spread):.2f}x)" if len(spread) > 1 else ""
            cells.append(f"{seconds:.4f} s vs NT {'–' if theirs is None else f'{theirs:.4f} s'}: "
                         + _ratio(ratio, GOAL_VS_NT[case]) + rounds)
        row(f"{case} N={SIZES[case]} {mode} vs neural-tangents", f">= {GOAL_VS_NT[case]}x", cells)
    for mode in ("full", "trace"):
        cells = []
        for label in labels:
            ours = settings[label][0]
            achieved = ours["flops"][mode] / ours["seconds"][f"mlp/{mode}"]
            cells.append(f"{achieved / 1e9:.1f} of {ours['matmul'] / 1e9:.1f} GFLOP/s: "
                         + _ratio(100 * achieved / ours["matmul"], 80, "{:.0f}%"))
        row(f"mlp {mode} GFLOP/s vs torch.matmul (counted FLOPs)", ">= 80%", cells)
    cells = []
    for label in labels:
        ours = settings[label][0]
        cells.append(f"{ours['tutorial_trace']:.3f} s vs {ours['auto_trace']:.4f} s: "
                     + _ratio(ours["tutorial_trace"] / ours["auto_trace"], 300, "{:.0f}x"))
    row("mlp trace: torch.func tutorial vs auto", ">= 300x", cells)
    cells = []
    for label in labels:
        t = settings[label][0]["tracker"]
        fraction = t["bookkeeping"] / t["kernel"]
        cells.append(f"{1e3 * t['bookkeeping']:.1f} ms / {1e3 * t['kernel']:.1f} ms: "
                     + ("{:.0f}%".format(100 * fraction)) + (" ✓" if fraction <= 0.15 else " ✗"))
    row("tracker bookkeeping / kernel per measurement", "<= 15%", cells)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", default="", help="python of a venv with neural-tangents")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per entry (median)")
    parser.add_argument("--quick", action="store_true", help="one timed call per entry, one epoch")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="default",
                        help="the torch processes' memory setting (see the module docstring)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of ours then neural-tangents per setting (medians over rounds)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)
    if args.child:
        child(int(args.child[0]), int(args.child[1]), int(args.child[2]), args.child[3], args.child[4])
        return 0
    import torch

    from bench_ntk import load_average, machine_description
    from bench_vs_nt import nt_seconds

    if args.rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")
    repeats, epochs, rounds = (1, 1, 1) if args.quick else (args.repeats, 3, args.rounds)
    started, load_before = time.perf_counter(), load_average()
    settings: Dict[str, Tuple[dict, Dict[str, Optional[float]]]] = {}
    for pinned in (True, False):
        measured = []
        for _ in range(rounds):  # alternating, so that the machine's swings reach both sides alike
            ours = torch_setting(repeats, pinned, epochs, args.allocator)
            nt = {key: nt_seconds(args.nt_python, key.split("/")[0], SIZES[key.split("/")[0]], key.split("/")[1],
                                  repeats, pinned) for key in KEYS}
            measured.append((ours, nt))
        ours = {**combine_rounds(measured), **torch_setting(repeats, pinned, epochs, args.allocator, "rest")}
        nt = {key: _median([theirs.get(key) for _, theirs in measured]) for key in KEYS}
        label = "1 thread (taskset -c 0)" if pinned else f"all threads ({ours['threads']})"
        settings[label] = (ours, nt)
    allocator = ALLOCATORS[args.allocator]
    if args.allocator != "huge-pages" and THP in os.environ:
        allocator += f", inherited {THP}={os.environ[THP]}"
    print(f"Machine: {machine_description(torch.device('cpu'))} (before: {load_before}); "
          f"torch {torch.__version__}; torch allocator: {allocator}; median of {repeats} calls per process, "
          f"medians over {rounds} alternating round(s); "
          f"{time.perf_counter() - started:.0f} s in all")
    if not args.nt_python:
        print("neural-tangents: not run (pass --nt-python)")
    print()
    print("\n".join(table(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
