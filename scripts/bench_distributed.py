"""Kernels across processes, and a kernel larger than memory, on this machine.

Two parts, each case in a fresh process (so that peak memory and thread settings are its
own):

1. **Processes.** The ``trace`` kernel of the digits MLP 64-256-256-10 (float32, the
   structured engine ``auto`` picks) on ``--n`` inputs: one process with one thread
   (pinned to CPU 0), one process with all threads, one process with one thread tiled as
   the two-process run is (the same block pairs), and two gloo processes with one thread
   each (pinned to CPUs 0 and 1) with ``gather="none"`` (compute only), ``"rank0"`` and
   ``"all"``. The inputs are 64-dim Gaussian vectors (digits has only 1797 images).
2. **Out of core.** The same kernel for ``--ooc-n`` inputs (default 50,000: a 10 GB
   float32 file) written with ``out=`` under ``--dir`` with ``memory_budget=--ooc-budget``,
   one process with all threads: wall time, the peak resident memory of the computation
   (``VmHWM`` after resetting it, minus the resident memory before) and the file size. The
   file is deleted afterwards.

    python scripts/bench_distributed.py [--n 6000] [--ooc-n 50000] [--ooc-budget 1GB]
                                        [--dir /tmp] [--skip-ooc] [--skip-processes]

Prints markdown tables: machine, torch version, threads, seconds, speed-ups, the CPU
seconds each process spent (the work each rank did, whatever else shares the machine),
tiles and bytes each rank sends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


def digits_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def inputs(n: int) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(1))


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _pin(cpus: List[int], threads: int) -> None:
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {available[c % len(available)] for c in cpus})
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- cases (run in their own process)


def case_single(n: int, threads: int, batch_size: Optional[int]) -> Dict[str, Any]:
    import ntk_torch as ntk

    _pin(list(range(threads)), threads)
    model, x = digits_mlp(), inputs(n)
    ntk.empirical_ntk(model, x[:256], mode="trace")  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    kernel = ntk.empirical_ntk(model, x, mode="trace", batch_size=batch_size)
    return {"seconds": time.perf_counter() - started, "cpu": [time.process_time() - cpu],
            "checksum": float(kernel.double().sum())}


def _rank(rank: int, world: int, init: str, n: int, result_file: str) -> None:
    import torch.distributed as dist

    import ntk_torch as ntk

    _pin([rank], 1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    model, x = digits_mlp(), inputs(n)
    ntk.empirical_ntk(model, x[:256], mode="trace", distributed=True)  # warm-up
    results = {}
    for gather in ("none", "rank0", "all"):
        kernel = ntk.NTK(model, mode="trace", distributed=True, gather=gather)
        dist.barrier()
        started, cpu = time.perf_counter(), time.process_time()
        result = kernel(x)
        cpu = time.process_time() - cpu
        dist.barrier()
        results[gather] = time.perf_counter() - started
        cpus = [None] * world
        dist.all_gather_object(cpus, cpu)
        results[f"cpu_{gather}"] = cpus
        if gather == "none":
            shares = [None] * world
            dist.all_gather_object(shares, [(t.rows, t.cols) for t in result.tiles])
            results["tiles"] = [len(share) for share in shares]
            results["sent_bytes"] = [sum((r1 - r0) * (c1 - c0) * 4 for (r0, r1), (c0, c1) in share)
                                     for share in shares]
            results["block_size"] = shares[0][0][0][1] - shares[0][0][0][0]
        if gather == "all" and rank == 0:
            results["checksum"] = float(result.double().sum())
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def case_two_processes(n: int) -> Dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        result = os.path.join(directory, "result.json")
        mp.start_processes(_rank, args=(2, os.path.join(directory, "init"), n, result), nprocs=2,
                           start_method="spawn")
        return json.loads(Path(result).read_text())


def case_out_of_core(n: int, budget: str, directory: str) -> Dict[str, Any]:
    import ntk_torch as ntk

    threads = torch.get_num_threads()
    model, x = digits_mlp(), inputs(n)
    work = Path(tempfile.mkdtemp(prefix="ntk-ooc-", dir=directory))
    try:
        ntk.empirical_ntk(model, x[:512], mode="trace", out=work / "warm-up.npy", memory_budget=budget)
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak resident set size starts again from the current one
        started = time.perf_counter()
        kernel = ntk.empirical_ntk(model, x, mode="trace", out=work / "kernel.npy", memory_budget=budget)
        seconds = time.perf_counter() - started
        peak = _status("VmHWM")
        size = (work / "kernel.npy").stat().st_size
        corner = kernel[:3, :3].clone()
        symmetric = bool(torch.equal(kernel[:64, -64:], kernel[-64:, :64].T))
        record = json.loads((work / "kernel.npy.progress.json").read_text())
    finally:
        shutil.rmtree(work)
    return {"seconds": seconds, "extra_peak_bytes": peak - before, "rss_before": before, "file_bytes": size,
            "threads": threads, "symmetric": symmetric, "corner": corner.tolist(), "tiling": record["tiling"],
            "method": record["fingerprint"]["method"]}


# --------------------------------------------------------------------------- driver


def _run(case: str, *arguments: Any, taskset: Optional[str] = None) -> Dict[str, Any]:
    command = [sys.executable, str(HERE), "--case", case, *map(str, arguments)]
    if taskset is not None and shutil.which("taskset"):
        command = ["taskset", "-c", taskset] + command
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores; torch {torch.__version__}"


def processes_table(n: int) -> str:
    """Part 1 as a markdown table."""
    one = _run("single", n, 1, 0, taskset="0")
    all_threads = _run("single", n, os.cpu_count(), 0)
    two = _run("two", n)
    tiled = _run("single", n, 1, two["block_size"], taskset="0")
    pairs = sum(two["tiles"])
    def cpu(seconds: List[float]) -> str:
        return " + ".join(f"{s:.2f}" for s in seconds)

    rows = [
        ("1 process, 1 thread", one["seconds"], cpu(one["cpu"]), "1 tile", "-"),
        (f"1 process, {os.cpu_count()} threads", all_threads["seconds"], cpu(all_threads["cpu"]), "1 tile", "-"),
        ("1 process, 1 thread, tiled as the 2 processes", tiled["seconds"], cpu(tiled["cpu"]), f"{pairs} tiles", "-"),
    ]
    sent = ", ".join(f"{b / 1e6:.1f}" for b in two["sent_bytes"])
    for gather in ("none", "rank0", "all"):
        rows.append((f"2 processes x 1 thread, gather={gather!r}", two[gather], cpu(two[f"cpu_{gather}"]),
                     f"{'+'.join(map(str, two['tiles']))} tiles", sent if gather != "none" else "0"))
    lines = [
        f"Machine: {_machine()}. Trace kernel of the digits MLP 64-256-256-10 (float32) on N={n} Gaussian "
        f"64-dim inputs; each case in a fresh process, warm; 2 processes on gloo pinned to CPUs 0 and 1; "
        f"block size {two['block_size']} when distributed.",
        "",
        "| case | seconds | vs 1 process 1 thread | CPU seconds (per rank) | tiles (per rank) | MB of blocks each "
        "rank sends |",
        "|---|---:|---:|---|---|---|",
    ]
    lines += [f"| {name} | {seconds:.3f} | {one['seconds'] / seconds:.2f}x | {cpus} | {tiles} | {mb} |"
              for name, seconds, cpus, tiles, mb in rows]
    agree = abs(two["checksum"] - one["checksum"]) <= 1e-4 * abs(one["checksum"])
    lines.append(f"\nThe gathered kernel's sum matches the single process's: {agree}.")
    return "\n".join(lines)


def out_of_core_table(n: int, budget: str, directory: str) -> str:
    """Part 2 as a markdown table."""
    result = _run("ooc", n, budget, directory)
    tiling = result["tiling"]
    rows = [
        ("kernel", f"trace, N={n}, float32, {result['file_bytes'] / 1e9:.2f} GB file, method {result['method']}"),
        ("memory budget", f"{budget} (block {tiling['block_size']}, {tiling['pairs']} block pairs)"),
        ("threads", str(result["threads"])),
        ("seconds", f"{result['seconds']:.1f}"),
        ("peak extra resident memory", f"{result['extra_peak_bytes'] / 1e6:,.0f} MB "
                                       f"(resident before: {result['rss_before'] / 1e6:,.0f} MB)"),
        ("exactly symmetric (corners)", str(result["symmetric"])),
    ]
    lines = [f"Machine: {_machine()}. Out-of-core kernel written under {directory}, deleted afterwards.", "",
             "| quantity | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000, help="inputs of the processes part")
    parser.add_argument("--ooc-n", type=int, default=50_000, help="inputs of the out-of-core kernel")
    parser.add_argument("--ooc-budget", default="1GB", help="memory budget of the out-of-core kernel")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the out-of-core kernel is written")
    parser.add_argument("--skip-processes", action="store_true")
    parser.add_argument("--skip-ooc", action="store_true")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        name, *values = args.case
        if name == "single":
            result = case_single(int(values[0]), int(values[1]), int(values[2]) or None)
        elif name == "two":
            result = case_two_processes(int(values[0]))
        else:
            result = case_out_of_core(int(values[0]), values[1], values[2])
        print(json.dumps(result))
        return 0
    if not args.skip_processes:
        print(processes_table(args.n), "\n", flush=True)
    if not args.skip_ooc:
        print(out_of_core_table(args.ooc_n, args.ooc_budget, args.dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
