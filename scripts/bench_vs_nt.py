"""The structured engine against neural-tangents, side by side: one thread pinned and all threads.

The MLP 784-512-512-10 at N=128 and the CNN 3x16x16 conv32-conv64-fc10 at N=64 of
``scripts/bench_ntk.py``, ``full`` and ``trace``, ``x2=None``; ours is an ``NTK`` built once
and called (the model analysed once, as neural-tangents' ``kernel_fn`` is jitted once;
the first call of each is untimed). Each setting runs in fresh
processes: pinned to CPU 0 (``taskset -c 0``) with one thread (``torch.set_num_threads(1)``;
for XLA ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``), then with
every thread. neural-tangents runs in its own environment (``--nt-python``, see
``scripts/bench_nt.py``).

    python scripts/bench_vs_nt.py --nt-python /tmp/nt-venv/bin/python [--repeats 3] [--quick]

``--quick``: ``trace`` only, one timed call. Prints a markdown table with the machine, torch,
threads and load average in its header.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("mlp", "cnn")
ONE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def child(modes: Sequence[str], repeats: int, threads: int) -> None:
    """In a fresh process: the structured engine's median seconds per (case, mode), JSON."""
    import torch

    sys.path.insert(0, HERE)
    from bench_ntk import cnn_case, mlp_case, time_call

    from ntk_torch import NTK

    if threads:
        torch.set_num_threads(threads)
    out = {}
    for case in (mlp_case(), cnn_case()):
        for mode in modes:
            kernel = NTK(case.model, mode=mode, method="structured")  # built once, like NT's jitted kernel_fn
            out[f"{case.name}/{mode}"] = time_call(lambda: kernel(case.inputs), torch.device("cpu"), 1, repeats)
    print(json.dumps({"seconds": out, "threads": torch.get_num_threads()}))


def _pinned(command: List[str], pinned: bool) -> List[str]:
    return ["taskset", "-c", "0"] + command if pinned and shutil.which("taskset") else command


def structured_seconds(modes: Sequence[str], repeats: int, pinned: bool) -> Tuple[Dict[str, float], int]:
    command = [sys.executable, __file__, "--child", ",".join(modes), str(repeats), "1" if pinned else "0"]
    done = subprocess.run(_pinned(command, pinned), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"structured run failed: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["threads"]


def nt_seconds(python: str, case: str, n: int, mode: str, repeats: int, pinned: bool) -> Optional[float]:
    """neural-tangents' median seconds, or None (printed why) when it did not run."""
    if not python:
        return None
    env = dict(os.environ)
    if pinned:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + ONE_THREAD_XLA).strip()
    command = [python, os.path.join(HERE, "bench_nt.py"), "--case", case, "--n", str(n), "--mode", mode,
               "--repeats", str(repeats)]
    done = subprocess.run(_pinned(command, pinned), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"neural-tangents {case} {mode}: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", default="", help="python of a venv with neural-tangents")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per entry (median)")
    parser.add_argument("--quick", action="store_true", help="trace only, one timed call")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0].split(","), int(args.child[1]), int(args.child[2]))
        return 0
    import torch

    sys.path.insert(0, HERE)
    from bench_ntk import machine_description

    modes = ("trace",) if args.quick else ("full", "trace")
    repeats = 1 if args.quick else args.repeats
    sizes = {"mlp": 128, "cnn": 64}
    settings = {}
    for label, pinned in (("1 thread", True), ("all threads", False)):
        ours, threads = structured_seconds(modes, repeats, pinned)
        theirs = {key: nt_seconds(args.nt_python, key.split("/")[0], sizes[key.split("/")[0]], key.split("/")[1],
                                  repeats, pinned) for key in ours}
        settings[label] = (ours, theirs, threads)
    all_threads = settings["all threads"][2]
    lines = [
        f"Machine: {machine_description(torch.device('cpu'))}; torch {torch.__version__}; threads: 1 pinned "
        f"(taskset -c 0) | all ({all_threads}); median of {repeats}",
        "",
        "| case | mode | structured s (1 thread) | NT s (1 thread) | vs NT (1 thread) | structured s (all) "
        "| NT s (all) | vs NT (all) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in settings["1 thread"][0]:
        cells = []
        for label in ("1 thread", "all threads"):
            ours, theirs, _ = settings[label]
            nt = theirs[key]
            cells += [f"{ours[key]:.4f}", "–" if nt is None else f"{nt:.4f}",
                      "–" if nt is None else f"{nt / ours[key]:.2f}x"]
        case, mode = key.split("/")
        lines.append(f"| {case} N={sizes[case]} | {mode} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
