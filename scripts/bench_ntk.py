#!/usr/bin/env python
"""The kernel benchmark: seconds and peak memory of each engine and mode, as a markdown table.

    python scripts/bench_ntk.py [--quick] [--cases mlp,cnn] [--methods ...] [--modes ...]
    python scripts/bench_ntk.py --structured [--nt-python PYTHON] [--skip-slow]
    python scripts/bench_ntk.py --bert-only [--repeats 5]
    python scripts/bench_ntk.py --vs-nt --nt-python PYTHON [--quick]   # scripts/bench_vs_nt.py
    python scripts/bench_ntk.py --scaling [--quick]                    # scripts/bench_scaling.py
    python scripts/bench_ntk.py --goals --nt-python PYTHON [--quick] [--allocator keep]   # scripts/bench_goals.py

``ntk-torch bench [args...]`` runs this script's :func:`main` from a source checkout.

Cases (the sizes the issues quote):

* ``mlp``: an MLP 784-512-512-10 (ReLU) at N=128;
* ``cnn``: 3x16x16 input, conv 32 and 64 channels (3x3, padding 1, ReLU), flatten,
  Linear to 10, at N=64.

Every case times ``empirical_ntk(model, x)`` (the kernel of a batch with itself; in the
neural-tangents comparison a kernel ``NTK(model, ...)`` built once, as neural-tangents'
jitted ``kernel_fn`` is, so that the model is analysed once) for each method and mode
(``loop``, the engine without ``vmap``, among them: its "vs jacobian" column is what a
model ``vmap`` cannot run pays), beside the torch.func tutorial's Jacobian-contraction function
(reimplemented here as the baseline: Jacobians of both inputs, then one einsum per
parameter tensor). Seconds are the median of ``repeats`` timed calls after ``warmup``
untimed ones; peak memory is the growth of the process's peak resident set during one
call on CPU (``/proc/self/clear_refs`` resets it), or ``torch.cuda.max_memory_allocated``
on CUDA. It is a benchmark, not a test: quote ratios from one run, side by side.

``--structured`` runs the structured-engine comparison instead (each number from this
one run, side by side):

* the MLP (N=128) and CNN (N=64) cases in ``full`` and ``trace`` mode: the structured
  engine, the Jacobian engine, the torch.func tutorial baseline and, when
  ``--nt-python`` names an interpreter with ``neural-tangents`` installed, its structured
  derivatives (``scripts/bench_nt.py``, identical architectures and N);
* a Transformer encoder layer (d_model 128, 4 heads, feed-forward 512, sequence 32,
  mean-pool, Linear to 10) at N=64: structured vs Jacobian engine;
* a BERT-like encoder (:class:`BertLikeEncoder`: token and position embeddings, 2 encoder
  layers of d_model 128, 4 heads, feed-forward 512, sequence 32, a pooled 2-class head) at
  N=16 in ``trace`` mode, structured vs Jacobian engine, in fresh processes with one
  thread pinned to CPU 0 and with every thread, for BERT's vocabulary (30522) and a small
  one (1000); ``--bert-only`` runs just this table;
* the structured engine's achieved GFLOP/s (its cost model's FLOPs over seconds) beside
  ``torch.matmul``'s on this machine, and the "dense-matmul floor": those FLOPs at
  matmul speed;
* ``trace`` mode for the MLP at N=8192 under ``memory_budget="1GB"`` in a subprocess,
  with its own peak resident memory (``VmHWM``) beside kernel and model sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ntk_torch import allocator
from ntk_torch.kernel import METHODS, MODES, NTK, empirical_ntk, explain

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A model and a batch to time the kernel of."""

    name: str
    description: str
    model: nn.Module
    inputs: torch.Tensor


def mlp_case(n: int = 128, device: str = "cpu") -> Case:
    """The MLP 784-512-512-10 (ReLU) and ``n`` random inputs, seeded."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    return Case("mlp", f"MLP 784-512-512-10, N={n}", model.to(device), torch.randn(n, 784, device=device))


def cnn_case(n: int = 64, device: str = "cpu") -> Case:
    """The CNN conv32-conv64-fc10 on 3x16x16 inputs and ``n`` random inputs, seeded."""
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


class EncoderClassifier(nn.Module):
    """A Transformer encoder layer, mean-pooled over the sequence, then Linear to classes."""

    def __init__(self, d_model=128, heads=4, feedforward=512, classes=10):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model, heads, feedforward, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):  # (N, T, d_model)
        return self.head(self.encoder(x).mean(dim=1))


def transformer_case(n: int = 64, sequence: int = 32) -> Case:
    """The encoder classifier and ``n`` random sequences of ``sequence`` tokens, seeded."""
    torch.manual_seed(0)
    model = EncoderClassifier()
    return Case("transformer", f"Transformer encoder d128 h4 ff512, T={sequence}, N={n}", model,
                torch.randn(n, sequence, 128))


class BertLikeEncoder(nn.Module):
    """A BERT-style encoder from torch modules: token embeddings and position embeddings
    (looked up with ids shared by every example, as Hugging Face's BERT does), LayerNorm,
    ``layers`` ``nn.TransformerEncoderLayer`` (GELU), a tanh pooler on the first token and
    a linear classifier."""

    def __init__(self, vocab=30522, positions=512, d_model=128, heads=4, feedforward=512, layers=2, classes=2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model, padding_idx=0)
        self.positions = nn.Embedding(positions, d_model)
        self.register_buffer("position_ids", torch.arange(positions).unsqueeze(0))
        self.norm = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, feedforward, dropout=0.1, activation="gelu", batch_first=True)
            for _ in range(layers)
        )
        self.pooler = nn.Linear(d_model, d_model)
        self.classifier = nn.Linear(d_model, classes)

    def forward(self, tokens):  # (N, T) token ids
        h = self.norm(self.tokens(tokens) + self.positions(self.position_ids[:, : tokens.shape[1]]))
        for layer in self.layers:
            h = layer(h)
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


BERT_VOCABS = (30522, 1000)  # BERT's WordPiece vocabulary, and a small one as a control


def bert_case(n: int = 16, vocab: int = 30522, sequence: int = 32) -> Case:
    """The BERT-like encoder (d_model 128, 4 heads, feed-forward 512, 2 layers, 512
    positions, 2 classes) and ``n`` random token sequences of length ``sequence``, seeded."""
    torch.manual_seed(0)
    tokens = torch.randint(1, vocab, (n, sequence))
    return Case("bert", bert_description(vocab, n, sequence), BertLikeEncoder(vocab=vocab), tokens)


def bert_description(vocab: int, n: int = 16, sequence: int = 32) -> str:
    return f"BERT-like encoder (vocab {vocab}, d128 h4 ff512 L2, T={sequence}), N={n}"


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


# --------------------------------------------------------------------------- measuring


def _status_bytes(field: str) -> Optional[int]:
    """A size from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None where it
    cannot be read."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


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
    peak = _status_bytes("VmHWM")
    return None if before is None or peak is None else peak - before


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


# --------------------------------------------------------------------------- the engine table


@dataclass
class Row:
    """One timed entry of the engine table."""

    case: str
    method: str
    mode: str
    seconds: float
    peak_bytes: Optional[int]


def run_case(
    case: Case, methods: Sequence[str], modes: Sequence[str], warmup: int, repeats: int, baseline: bool
) -> List[Row]:
    """A :class:`Row` for each mode and method (and the tutorial baseline) on ``case``;
    each is printed to stderr as it finishes."""
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
    """The CPU model, its core count and, on CUDA, the GPU's name."""
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
    return text + f", {load_average()}"


def load_average() -> str:
    """``load average 1m 5m 15m``: a figure measured under load is recognisable."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def format_table(cases: Sequence[Case], rows: Sequence[Row], device: torch.device, repeats: int) -> str:
    """The markdown table of ``rows``, after a line naming the machine, torch and threads."""
    lines = [
        f"Machine: {machine_description(device)}; device {device}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; memory: {allocator.describe()}; median of {repeats} call(s).",
        "",
        "| case | mode | method | seconds | peak extra memory (MB) | vs tutorial baseline | vs jacobian |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    descriptions = {c.name: c.description for c in cases}
    baseline = {(r.case, r.mode): r.seconds for r in rows if r.method == "tutorial baseline"}
    jacobian = {(r.case, r.mode): r.seconds for r in rows if r.method == "jacobian"}
    for r in rows:
        memory = "n/a" if r.peak_bytes is None else f"{max(r.peak_bytes, 0) / 1e6:,.0f}"
        ratios = []
        for reference in (baseline.get((r.case, r.mode)), jacobian.get((r.case, r.mode))):
            ratios.append(f"{reference / r.seconds:.2g}x" if reference else "n/a")
        lines.append(
            f"| {descriptions[r.case]} | {r.mode} | {r.method} | {r.seconds:.4f} | {memory} | {ratios[0]} | {ratios[1]} |"
        )
    return "\n".join(lines)


def _split(value: str, allowed: Sequence[str], name: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise SystemExit(f"error: --{name} takes a comma-separated list from {', '.join(allowed)}; got {value!r}")
    return items


def engine_table(args: argparse.Namespace) -> str:
    """Time every case, method and mode the arguments select; print and return the
    markdown table (and write it to ``--output``)."""
    cases = _split(args.cases, list(CASES), "cases")
    default_methods = "auto" if args.quick else ",".join(m for m in METHODS if m != "auto")
    methods = _split(args.methods or default_methods, list(METHODS), "methods")
    modes = _split(args.modes or ("full,trace" if args.quick else ",".join(MODES)), list(MODES), "modes")
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


# --------------------------------------------------------------------------- --structured


def matmul_gflops(repeats: int = 5) -> float:
    """``torch.matmul``'s GFLOP/s on this CPU (1280x512 @ 512x1280, median of ``repeats``)."""
    a, b = torch.randn(1280, 512), torch.randn(512, 1280)
    seconds = time_call(lambda: a @ b, torch.device("cpu"), 1, repeats)
    return 2 * 1280 * 512 * 1280 / seconds / 1e9


def neural_tangents(python: str, case: str, n: int, mode: str) -> Tuple[Optional[float], str]:
    """neural-tangents' seconds for ``case`` (``scripts/bench_nt.py`` run by ``python``)
    and a note naming its versions, or None and why it did not run."""
    if not python:
        return None, "not run (no --nt-python)"
    command = [python, os.path.join(HERE, "bench_nt.py"), "--case", case, "--n", str(n), "--mode", mode]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], f"jax {result['jax']}, neural-tangents {result['neural_tangents']}"


def _own_peak_rss() -> int:
    """This process's peak resident set in bytes (``VmHWM``; ``ru_maxrss`` as a fallback)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def large_trace_child(n: int) -> None:
    """In a fresh process: the MLP trace kernel at N=n under a 1 GB budget; prints its
    seconds and peak memory beside the kernel's, model's and inputs' sizes (JSON)."""
    case = mlp_case(n=n)
    start = time.perf_counter()
    kernel = empirical_ntk(case.model, case.inputs, mode="trace", method="structured", memory_budget="1GB")
    seconds = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in case.model.parameters())
    print(json.dumps({
        "seconds": seconds,
        # VmHWM is this process's own high-water mark; ru_maxrss is not: Linux carries
        # the parent's peak over fork+exec, so it reported the benchmark's earlier runs.
        "peak_rss": _own_peak_rss(),
        "kernel_bytes": kernel.numel() * kernel.element_size(),
        "model_bytes": model_bytes,
        "inputs_bytes": case.inputs.numel() * case.inputs.element_size(),
    }))


def interleaved_seconds(calls: Dict[str, Callable[[], object]], warmup: int, repeats: int) -> Dict[str, float]:
    """Median wall seconds of each call, the calls taking turns (so a busy machine slows
    them alike): ``warmup`` untimed rounds, then ``repeats`` timed ones."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    seconds: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def bert_child(vocab: int, threads: int, repeats: int) -> None:
    """In a fresh process: the structured and Jacobian engines' seconds on the BERT-like
    encoder's trace kernel at N=16, with ``threads`` torch threads (0: torch's default),
    and how many parameter tensors fall back (JSON)."""
    if threads:
        torch.set_num_threads(threads)
    case = bert_case(vocab=vocab)
    kernels = {method: NTK(case.model, mode="trace", method=method) for method in ("structured", "jacobian")}
    seconds = interleaved_seconds({m: (lambda k=k: k(case.inputs)) for m, k in kernels.items()}, 1, repeats)
    fallback = kernels["structured"].explain(case.inputs).fallback
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "fallback": sorted(fallback)}))


def _bert_run(vocab: int, pinned: bool, repeats: int) -> Tuple[Optional[dict], str]:
    """One :func:`bert_child` run: one thread pinned to CPU 0 (``taskset -c 0`` where it
    exists), or every thread; the result, or None and why it failed."""
    command = [sys.executable, __file__, "--bert-child", str(vocab), "--repeats", str(repeats),
               "--bert-threads", "1" if pinned else "0"]
    note = ""
    if pinned:
        if shutil.which("taskset"):
            command = ["taskset", "-c", "0"] + command
        else:
            note = " (not pinned: no taskset)"
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1]), note


def bert_table(repeats: int) -> str:
    """The BERT-like encoder at N=16, trace mode: structured vs Jacobian engine, one
    pinned thread and every thread, for BERT's vocabulary and a small one."""
    lines = [
        "| case | mode | threads | structured s | jacobian s | vs jacobian | falls back |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for vocab in BERT_VOCABS:
        description = bert_description(vocab)
        for pinned in (True, False):
            result, note = _bert_run(vocab, pinned, repeats)
            if result is None:
                lines.append(f"| {description} | trace | {'1' if pinned else 'all'} | failed: {note} | | | |")
                continue
            s = result["seconds"]
            threads = f"{result['threads']}{' pinned' if pinned and not note else note}"
            owners = sorted({name.rpartition(".")[0] for name in result["fallback"]})
            falls_back = f"{len(result['fallback'])} tensors of {', '.join(owners)}" if owners else "nothing"
            lines.append(
                f"| {description} | trace | {threads} | {s['structured']:.4f} | {s['jacobian']:.4f} | "
                f"{s['jacobian'] / s['structured']:.1f}x | {falls_back} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def _structured_row(args: argparse.Namespace, case: Case, mode: str, matmul_rate: float) -> Tuple[str, Optional[str]]:
    """The comparison table's row for ``case`` in ``mode``, and the neural-tangents note
    (None for the Transformer, which neural-tangents is not run on)."""
    cpu, model, x = torch.device("cpu"), case.model, case.inputs

    def seconds(method: str, warmup: int, repeats: int) -> float:
        kernel = NTK(model, mode=mode, method=method)  # built once, like neural-tangents' jitted kernel_fn
        return time_call(lambda: kernel(x), cpu, warmup, repeats)

    structured = seconds("structured", 1, args.repeats)
    flops = explain(model, x, mode=mode, method="structured").costs["structured"]
    slow_skipped = args.skip_slow and case.name == "mlp"
    jacobian = float("nan") if slow_skipped else seconds("jacobian", 0, 1)
    tutorial = nt_seconds = float("nan")
    nt_note = None
    if case.name != "transformer":
        if not slow_skipped:
            tutorial = time_call(lambda: tutorial_baseline(model, x, x, mode), cpu, 0, 1)
        measured, nt_note = neural_tangents(args.nt_python, case.name, x.shape[0], mode)
        nt_seconds = float("nan") if measured is None else measured
    row = (
        f"| {case.name} N={x.shape[0]} | {mode} | {structured:.4f} | {flops / structured / 1e9:.1f} | "
        f"{flops / (matmul_rate * 1e9):.4f} | {jacobian:.3f} | {tutorial:.3f} | {nt_seconds:.4f} | "
        f"{tutorial / structured:.0f}x | {nt_seconds / structured:.2f}x | {jacobian / structured:.1f}x |"
    )
    return row, nt_note


def _large_trace_line(large_n: int) -> str:
    """The MLP trace kernel at N=``large_n`` under a 1 GB budget, run in a subprocess."""
    done = subprocess.run([sys.executable, __file__, "--large-trace-child", str(large_n)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"MLP trace N={large_n}: failed: {done.stderr.strip()[-500:]}"
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return (
        f"MLP trace N={large_n}, memory_budget=1GB: {r['seconds']:.1f} s, peak RSS "
        f"{r['peak_rss'] / 1e6:,.0f} MB (kernel {r['kernel_bytes'] / 1e6:,.0f} MB, model "
        f"{r['model_bytes'] / 1e6:,.1f} MB, inputs {r['inputs_bytes'] / 1e6:,.0f} MB; bound 1000 MB + "
        f"kernel + model + inputs = {(1e9 + r['kernel_bytes'] + r['model_bytes'] + r['inputs_bytes']) / 1e6:,.0f} MB)"
    )


def structured_report(args: argparse.Namespace) -> str:
    """The structured-engine comparison (see the module docstring); printed and returned."""
    matmul_rate = matmul_gflops()
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, {load_average()}",
        f"torch.matmul (1280x512 @ 512x1280): {matmul_rate:.1f} GFLOP/s",
        "",
        "| case | mode | structured s | GFLOP/s | floor s | jacobian s | tutorial s | neural-tangents s |"
        " vs tutorial | vs NT | vs jacobian |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nt_note = None
    for case in (mlp_case(), cnn_case(), transformer_case()):
        for mode in ("full", "trace"):
            row, note = _structured_row(args, case, mode, matmul_rate)
            nt_note = note or nt_note
            lines.append(row)
            print(row, file=sys.stderr, flush=True)
    lines.append(f"neural-tangents: {nt_note}")
    lines.append(_large_trace_line(args.large_n))
    lines += ["", bert_table(args.repeats)]
    table = "\n".join(lines)
    print(table)
    return table


# --------------------------------------------------------------------------- command line


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The benchmark's options, both modes; ``prog`` names the command in its usage."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import bench_goals  # its --allocator choices

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
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
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--output", help="also write the markdown table to this file")
    structured = parser.add_argument_group("the structured-engine comparison")
    structured.add_argument("--structured", action="store_true", help="run it instead of the engine table")
    structured.add_argument("--nt-python", default="", help="python of a venv with neural-tangents")
    structured.add_argument("--large-n", type=int, default=8192, help="N of the memory-budgeted trace kernel")
    structured.add_argument("--skip-slow", action="store_true", help="skip the MLP's Jacobian/tutorial runs")
    structured.add_argument("--bert-only", action="store_true",
                            help="only the BERT-like encoder's table (structured vs jacobian, N=16, trace)")
    structured.add_argument("--vs-nt", action="store_true",
                            help="structured vs neural-tangents, 1 thread pinned and all threads (bench_vs_nt.py)")
    structured.add_argument("--scaling", action="store_true",
                            help="trace kernel time and memory against N and width (bench_scaling.py)")
    structured.add_argument("--goals", action="store_true",
                            help="every performance goal in one table, 1 thread pinned and all threads (bench_goals.py)")
    structured.add_argument("--allocator", choices=list(bench_goals.ALLOCATORS), default="default",
                            help="with --goals: the torch processes' memory setting (bench_goals.py)")
    structured.add_argument("--large-trace-child", type=int, metavar="N", help=argparse.SUPPRESS)
    structured.add_argument("--bert-child", type=int, metavar="VOCAB", help=argparse.SUPPRESS)
    structured.add_argument("--bert-threads", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run the benchmark for command-line arguments ``argv`` (default ``sys.argv[1:]``);
    return the exit status."""
    args = build_parser(prog).parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: --threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.large_trace_child is not None:
        large_trace_child(args.large_trace_child)
    elif args.bert_child is not None:
        bert_child(args.bert_child, args.bert_threads, args.repeats)
    elif args.bert_only:
        table = "\n".join([f"torch {torch.__version__}, {machine_description(torch.device('cpu'))}",
                           f"median of {args.repeats} interleaved call(s) after one warm-up round", "",
                           bert_table(args.repeats)])
        print(table)
    elif args.vs_nt or args.scaling or args.goals:
        sys.path.insert(0, HERE)
        if args.goals:
            import bench_goals

            extra = (["--quick"] if args.quick else []) + ["--allocator", args.allocator]
            return bench_goals.main(["--nt-python", args.nt_python, "--repeats", str(args.repeats)] + extra)
        if args.vs_nt:
            import bench_vs_nt

            quick = ["--quick"] if args.quick else []
            return bench_vs_nt.main(["--nt-python", args.nt_python, "--repeats", str(args.repeats)] + quick)
        import bench_scaling

        return bench_scaling.main(["--quick"] if args.quick else [])
    elif args.structured:
        structured_report(args)
    else:
        engine_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
