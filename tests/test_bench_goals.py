"""The goals benchmark: its FLOP count and its table (smoke tests, not timings)."""

import sys

import pytest
from torch import nn

from ntk_torch import cli

if str(cli.SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(cli.SCRIPTS_DIR))
import bench_goals  # noqa: E402


def test_counted_flops_of_a_small_mlp_by_hand():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    n, o = 5, 2
    forward = 2 * n * (3 * 4 + 4 * 2)
    cotangents = 2 * n * o * (4 * 2)
    full_grams = (2 * n * n * 4 + 2 * (n * o) ** 2 * 4 + 2 * n * n * o * o
                  + 2 * n * n * 5 + 2 * (n * o) ** 2 * 2 + 2 * n * n * o * o)
    trace_grams = (2 * n * n * 4 + 2 * n * n * o * 4 + 2 * n * n
                   + 2 * n * n * 5 + 2 * n * n * o * 2 + 2 * n * n)
    assert bench_goals.mlp_counted_flops(model, n, "full") == forward + cotangents + full_grams / 2
    assert bench_goals.mlp_counted_flops(model, n, "trace") == forward + cotangents + trace_grams / 2


def test_goals_table_marks_each_goal_and_missing_neural_tangents(monkeypatch, capsys):
    def fake(repeats, pinned, epochs, allocator="default", part="kernels"):
        return {
            "seconds": {"mlp/full": 0.04, "mlp/trace": 0.02, "cnn/full": 0.2, "cnn/trace": 0.1},
            "threads": 1 if pinned else 2, "matmul": 1e11, "flops": {"full": 3.6e9, "trace": 1.0e9},
            "auto_trace": 0.01, "tutorial_trace": 4.0,
            "tracker": {"bookkeeping": 0.001, "kernel": 0.012, "measurements": 6, "threads": 1},
        }

    monkeypatch.setattr(bench_goals, "torch_setting", fake)
    assert bench_goals.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "neural-tangents: not run" in out
    assert "| mlp full GFLOP/s vs torch.matmul (counted FLOPs) | >= 80% | 90.0 of 100.0 GFLOP/s: 90% ✓" in out
    assert "4.000 s vs 0.0100 s: 400x ✓" in out
    assert "1.0 ms / 12.0 ms: 8% ✓" in out
    assert out.count("vs NT –: –") == 8


def test_the_allocator_setting_reaches_the_torch_processes_and_the_header(monkeypatch, capsys):
    """``--allocator huge-pages`` sets THP_MEM_ALLOC_ENABLE=1 in the torch child's
    environment only; ``keep`` is passed to the child, which turns it on itself (a
    process's malloc settings are not inherited); the header names the setting."""
    import subprocess

    seen = []

    def fake_run(command, capture_output, text, env=None):
        seen.append((command[-1], env))
        assert command[-2] in bench_goals.ALLOCATORS
        return subprocess.CompletedProcess(command, 0, stdout='{"threads": 1}\n', stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    for allocator in ("huge-pages", "keep", "default"):
        assert bench_goals.torch_setting(1, True, 1, allocator) == {"threads": 1}
    assert seen[0][1]["THP_MEM_ALLOC_ENABLE"] == "1"
    assert seen[1] == ("kernels", None) and seen[2] == ("kernels", None)

    calls = []

    def fake(repeats, pinned, epochs, allocator="default", part="kernels"):
        calls.append(allocator)
        return {
            "seconds": {"mlp/full": 0.04, "mlp/trace": 0.02, "cnn/full": 0.2, "cnn/trace": 0.1},
            "threads": 1, "matmul": 1e11, "flops": {"full": 3.6e9, "trace": 1.0e9},
            "auto_trace": 0.01, "tutorial_trace": 4.0,
            "tracker": {"bookkeeping": 0.001, "kernel": 0.012, "measurements": 6, "threads": 1},
        }

    monkeypatch.setattr(bench_goals, "torch_setting", fake)
    assert bench_goals.main(["--quick", "--allocator", "keep"]) == 0
    assert calls == ["keep"] * 4  # kernels and the rest, per setting
    assert "torch allocator: keep (ntk_torch.keep_freed_memory" in capsys.readouterr().out
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert bench_goals.main(["--quick"]) == 0
    assert "torch allocator: default (glibc's and torch's), inherited THP_MEM_ALLOC_ENABLE=1" in capsys.readouterr().out


def test_rounds_alternate_the_two_sides_and_report_medians_and_their_spread(monkeypatch, capsys):
    import bench_vs_nt

    order, ours_seconds, nt_seconds = [], iter([0.04, 0.08, 0.05]), iter([0.06, 0.06, 0.10])

    def fake(repeats, pinned, epochs, allocator="default", part="kernels"):
        order.append(part)
        if part == "rest":
            return {"threads": 1, "auto_trace": 0.01, "tutorial_trace": 4.0,
                    "tracker": {"bookkeeping": 0.001, "kernel": 0.012, "measurements": 6, "threads": 1}}
        mlp = next(ours_seconds) if pinned else 0.04
        return {"seconds": {"mlp/full": mlp, "mlp/trace": 0.02, "cnn/full": 0.2, "cnn/trace": 0.1},
                "threads": 1, "matmul": 1e11, "flops": {"full": 3.6e9, "trace": 1.0e9}}

    def fake_nt(python, case, n, mode, repeats, pinned):
        order.append("nt")
        return next(nt_seconds) if pinned and (case, mode) == ("mlp", "full") else 0.05

    monkeypatch.setattr(bench_goals, "torch_setting", fake)
    monkeypatch.setattr(bench_vs_nt, "nt_seconds", fake_nt)
    assert bench_goals.main(["--rounds", "3", "--nt-python", "python"]) == 0
    assert order == (["kernels"] + ["nt"] * 4) * 3 + ["rest"] + (["kernels"] + ["nt"] * 4) * 3 + ["rest"]
    out = capsys.readouterr().out
    # medians 0.05 s and 0.06 s: 1.20x; the rounds' own ratios 1.5x, 0.75x, 2.0x
    assert "0.0500 s vs NT 0.0600 s: 1.20x ✗ (rounds 0.75-2.00x)" in out
    assert "medians over 3 alternating round(s)" in out
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        bench_goals.main(["--rounds", "0"])


def test_the_child_turns_keep_on_in_its_own_process(monkeypatch):
    import ntk_torch

    asked = []
    monkeypatch.setattr(ntk_torch, "keep_freed_memory", lambda: asked.append(True) or False)
    with pytest.raises(SystemExit, match="--allocator keep needs glibc"):
        bench_goals.child(1, 1, 1, "keep")
    assert asked == [True]


def test_bench_ntk_goals_forwards_quick_and_the_allocator(monkeypatch):
    import bench_ntk

    forwarded = []
    monkeypatch.setattr(bench_goals, "main", lambda argv: forwarded.append(argv) or 0)
    assert bench_ntk.main(["--goals", "--quick", "--allocator", "keep", "--repeats", "2"]) == 0
    assert bench_ntk.main(["--goals"]) == 0
    assert forwarded == [["--nt-python", "", "--repeats", "2", "--quick", "--allocator", "keep"],
                         ["--nt-python", "", "--repeats", "3", "--allocator", "default"]]
