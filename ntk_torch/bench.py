"""The kernel benchmark: seconds and peak memory of each engine and mode, as a markdown table.

Cases (the sizes the issues quote):

* ``mlp``: an MLP 784-512-512-10 (ReLU) at N=128;
* ``cnn``: 3x16x16 input, conv 32 and 64 channels (3x3, padding 1, ReLU), flatten,
  Linear to 10, at N=64.

Every case times ``empirical_ntk(model, x)`` (the kernel of a batch with itself) for each
method and mode, beside the torch.func tutorial's Jacobian-contraction function
(reimplemented here as the baseline: Jacobians of both inputs, then one einsum per
parameter tensor). Seconds are the median of ``repeats`` timed calls after ``warmup``
untimed ones; peak memory is the growth of the process's peak resident set during one
call on CPU (``/proc/self/clear_refs`` resets it), or ``torch.cuda.max_memory_allocated``
on CUDA. It is a benchmark, not a test: quote ratios from one run, side by side.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .kernel import METHODS, MODES, empirical_ntk


@dataclass
class Case:
    name: str
    description: str
    model: nn.Module
    inputs: torch.Tensor


def mlp_case(n: int = 128, device: str = "cpu") -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    return Case("mlp", f"MLP 784-512-512-10, N={n}", model.to(device), torch.randn(n, 784, device=device))


def cnn_case(n: int = 64, device: str = "cpu") -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 16 * 16, 10),
    )
    return Case(
        "cnn", f"CNN 3x16x16 conv32-conv64-fc10, N={n}", model.to(device), torch.randn(n, 3, 16, 16, device=device)
    )


CASES: Dict[str, Callable[..., Case]] = {"mlp": mlp_case, "cnn": cnn_case}


def tutorial_baseline(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, mode: str) -> torch.Tensor:
    """The torch.func tutorial's Jacobian contraction: full Jacobians of both inputs, then
    one einsum per parameter tensor, summed (``trace`` contracts the output index too)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(single), (None, 0))(params, x1)
    jac2 = vmap(jacrev(single), (None, 0))(params, x2)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = [j.flatten(2) for j in jac2.values()]
    equation = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa"}[mode]
    return torch.stack([torch.einsum(equation, a, b) for a, b in zip(jac1, jac2)]).sum(0)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"{field}:\s+(\d+) kB", status.read())
    return int(match.group(1)) * 1024 if match else 0


def measure_peak(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak extra bytes while running ``fn`` once (``None`` where it cannot be read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident set (VmHWM) to the current one
    except OSError:
        return None
    before = _status_bytes("VmRSS")
    result = fn()
    del result
    return _status_bytes("VmHWM") - before


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        del result
    return statistics.median(seconds)


@dataclass
class Row:
    case: str
    method: str
    mode: str
    seconds: float
    peak_bytes: Optional[int]


def run_case(
    case: Case, methods: Sequence[str], modes: Sequence[str], warmup: int, repeats: int, baseline: bool
) -> List[Row]:
    device = case.inputs.device
    rows = []
    for mode in modes:
        candidates = {m: (lambda m=m: empirical_ntk(case.model, case.inputs, mode=mode, method=m)) for m in methods}
        if baseline:
            candidates["tutorial baseline"] = lambda: tutorial_baseline(case.model, case.inputs, case.inputs, mode)
        for method, fn in candidates.items():
            peak = measure_peak(fn, device)
            seconds = time_call(fn, device, warmup, repeats)
            rows.append(Row(case.name, method, mode, seconds, peak))
            print(f"  {case.name:5s} {mode:8s} {method:18s} {seconds:9.4f} s", file=sys.stderr, flush=True)
    return rows


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            match = re.search(r"model name\s*:\s*(.+)", info.read())
            cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def format_table(cases: Sequence[Case], rows: Sequence[Row], device: torch.device, repeats: int) -> str:
    lines = [
        f"Machine: {machine_description(device)}; device {device}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; median of {repeats} call(s).",
        "",
        "| case | mode | method | seconds | peak extra memory (MB) | vs tutorial baseline |",
        "|---|---|---|---:|---:|---:|",
    ]
    descriptions = {c.name: c.description for c in cases}
    baseline = {(r.case, r.mode): r.seconds for r in rows if r.method == "tutorial baseline"}
    for r in rows:
        memory = "n/a" if r.peak_bytes is None else f"{max(r.peak_bytes, 0) / 1e6:,.0f}"
        reference = baseline.get((r.case, r.mode))
        ratio = f"{reference / r.seconds:.1f}x" if reference else "n/a"
        lines.append(
            f"| {descriptions[r.case]} | {r.mode} | {r.method} | {r.seconds:.4f} | {memory} | {ratio} |"
        )
    return "\n".join(lines)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="bench_ntk", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: method 'auto' beside the baseline, full and trace modes, one call each",
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: every engine)")
    parser.add_argument("--modes", help=f"comma-separated, from {', '.join(MODES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per entry (median)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the tutorial baseline")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--output", help="also write the markdown table to this file")
    return parser


def _split(value: str, allowed: Sequence[str], name: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise SystemExit(f"error: --{name} takes a comma-separated list from {', '.join(allowed)}; got {value!r}")
    return items


def run(args: argparse.Namespace) -> str:
    """Run the benchmark for parsed arguments; print and return the markdown table."""
    cases = _split(args.cases, list(CASES), "cases")
    default_methods = "auto" if args.quick else ",".join(m for m in METHODS if m != "auto")
    methods = _split(args.methods or default_methods, list(METHODS), "methods")
    modes = _split(args.modes or ("full,trace" if args.quick else ",".join(MODES)), list(MODES), "modes")
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    warmup, repeats = (0, 1) if args.quick else (1, args.repeats)
    built = [CASES[name](device=args.device) for name in cases]
    rows: List[Row] = []
    for case in built:
        rows += run_case(case, methods, modes, warmup, repeats, baseline=not args.no_baseline)
    table = format_table(built, rows, device, repeats)
    print(table)
    if args.output:
        with open(args.output, "w") as out:
            out.write(table + "\n")
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
