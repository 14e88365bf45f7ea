#!/usr/bin/env python
"""Kernel benchmark; see ``ntk_torch/bench.py`` (same as ``ntk-torch bench``).

``--structured`` runs the structured-engine comparison instead (each number from this
one run, side by side):

* the MLP (N=128) and CNN (N=64) cases in ``full`` and ``trace`` mode: the structured
  engine, the Jacobian engine, the torch.func tutorial baseline and, when
  ``--nt-python`` names an interpreter with ``neural-tangents`` installed, its structured
  derivatives (``scripts/bench_nt.py``, identical architectures and N);
* a Transformer encoder layer (d_model 128, 4 heads, feed-forward 512, sequence 32,
  mean-pool, Linear to 10) at N=64: structured vs Jacobian engine;
* the structured engine's achieved GFLOP/s (its cost model's FLOPs over seconds) beside
  ``torch.matmul``'s on this machine, and the "dense-matmul floor": those FLOPs at
  matmul speed;
* ``trace`` mode for the MLP at N=8192 under ``memory_budget="1GB"`` in a subprocess,
  with its own peak resident memory (``VmHWM``) beside kernel and model sizes.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from ntk_torch.bench import cnn_case, main as bench_main, mlp_case, time_call, tutorial_baseline
from ntk_torch.kernel import empirical_ntk, explain

HERE = os.path.dirname(os.path.abspath(__file__))


class EncoderClassifier(nn.Module):
    def __init__(self, d_model=128, heads=4, feedforward=512, classes=10):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model, heads, feedforward, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):  # (N, T, d_model)
        return self.head(self.encoder(x).mean(dim=1))


def matmul_gflops(repeats: int = 5) -> float:
    a, b = torch.randn(1280, 512), torch.randn(512, 1280)
    seconds = time_call(lambda: a @ b, torch.device("cpu"), 1, repeats)
    return 2 * 1280 * 512 * 1280 / seconds / 1e9


def neural_tangents(python: str, case: str, n: int, mode: str):
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
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def large_trace_child(n: int) -> None:
    """In a fresh process: the MLP trace kernel at N=n under a 1 GB budget."""
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


def structured_report(args) -> str:
    cpu = torch.device("cpu")
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"]
    flops_rate = matmul_gflops()
    lines.append(f"torch.matmul (1280x512 @ 512x1280): {flops_rate:.1f} GFLOP/s")
    lines += ["", "| case | mode | structured s | GFLOP/s | floor s | jacobian s | tutorial s | neural-tangents s |"
              " vs tutorial | vs NT | vs jacobian |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nt_note = None
    cases = [mlp_case(), cnn_case()]
    torch.manual_seed(0)
    transformer = EncoderClassifier()
    transformer_x = torch.randn(64, 32, 128)
    for case, name in [(c, c.name) for c in cases] + [(None, "transformer")]:
        model, x = (case.model, case.inputs) if case else (transformer, transformer_x)
        for mode in ("full", "trace"):
            def run(method, warmup, repeats):
                return time_call(lambda: empirical_ntk(model, x, mode=mode, method=method), cpu, warmup, repeats)

            structured = run("structured", 1, args.repeats)
            flops = explain(model, x, mode=mode, method="structured").costs["structured"]
            jacobian = run("jacobian", 0, 1) if (name != "mlp" or not args.skip_slow) else float("nan")
            tutorial = nt_seconds = float("nan")
            if case is not None:
                if not args.skip_slow or name != "mlp":
                    tutorial = time_call(lambda: tutorial_baseline(model, x, x, mode), cpu, 0, 1)
                nt_seconds, nt_note = neural_tangents(args.nt_python, name, x.shape[0], mode)
                nt_seconds = float("nan") if nt_seconds is None else nt_seconds
            gflops = flops / structured / 1e9
            floor = flops / (flops_rate * 1e9)
            lines.append(
                f"| {name} N={x.shape[0]} | {mode} | {structured:.4f} | {gflops:.1f} | {floor:.4f} | "
                f"{jacobian:.3f} | {tutorial:.3f} | {nt_seconds:.4f} | {tutorial / structured:.0f}x | "
                f"{nt_seconds / structured:.2f}x | {jacobian / structured:.1f}x |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    lines.append(f"neural-tangents: {nt_note}")
    done = subprocess.run([sys.executable, __file__, "--large-trace-child", str(args.large_n)],
                          capture_output=True, text=True)
    if done.returncode == 0:
        r = json.loads(done.stdout.strip().splitlines()[-1])
        lines.append(
            f"MLP trace N={args.large_n}, memory_budget=1GB: {r['seconds']:.1f} s, peak RSS "
            f"{r['peak_rss'] / 1e6:,.0f} MB (kernel {r['kernel_bytes'] / 1e6:,.0f} MB, model "
            f"{r['model_bytes'] / 1e6:,.1f} MB, inputs {r['inputs_bytes'] / 1e6:,.0f} MB; bound 1000 MB + "
            f"kernel + model + inputs = {(1e9 + r['kernel_bytes'] + r['model_bytes'] + r['inputs_bytes']) / 1e6:,.0f} MB)"
        )
    else:
        lines.append(f"MLP trace N={args.large_n}: failed: {done.stderr.strip()[-500:]}")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    if "--large-trace-child" in sys.argv:
        large_trace_child(int(sys.argv[sys.argv.index("--large-trace-child") + 1]))
    elif "--structured" in sys.argv:
        parser = argparse.ArgumentParser(description="structured-engine comparison")
        parser.add_argument("--structured", action="store_true")
        parser.add_argument("--nt-python", default="", help="python of a venv with neural-tangents")
        parser.add_argument("--repeats", type=int, default=3)
        parser.add_argument("--large-n", type=int, default=8192)
        parser.add_argument("--skip-slow", action="store_true", help="skip the MLP's Jacobian/tutorial runs")
        structured_report(parser.parse_args())
    else:
        sys.exit(bench_main())
