"""The goals benchmark: its FLOP count and its table (smoke tests, not timings)."""

import sys

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
    def fake(repeats, pinned, epochs, huge_pages=False):
        return {
            "seconds": {"mlp/full": 0.04, "mlp/trace": 0.02, "cnn/full": 0.2, "cnn/trace": 0.1},
            "threads": 1 if pinned else 2, "matmul": 1e11, "flops": {"full": 3.6e9, "trace": 1.0e9},
            "auto_trace": 0.01, "tutorial_trace": 4.0,
            "tracker": {"measure": 0.013, "kernel": 0.012, "measurements": 6, "threads": 1},
        }

    monkeypatch.setattr(bench_goals, "torch_setting", fake)
    assert bench_goals.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "neural-tangents: not run" in out
    assert "| mlp full GFLOP/s vs torch.matmul (counted FLOPs) | >= 80% | 90.0 of 100.0 GFLOP/s: 90% ✓" in out
    assert "4.000 s vs 0.0100 s: 400x ✓" in out
    assert "1.0 ms / 12.0 ms: 8% ✓" in out
    assert out.count("vs NT –: –") == 8


def test_huge_pages_reach_the_torch_processes_and_the_header(monkeypatch, capsys):
    """``--huge-pages`` sets THP_MEM_ALLOC_ENABLE=1 in the torch child's environment only,
    and the header says so."""
    import subprocess

    seen = []

    def fake_run(command, capture_output, text, env=None):
        seen.append(env)
        return subprocess.CompletedProcess(command, 0, stdout='{"threads": 1}\n', stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert bench_goals.torch_setting(1, True, 1, huge_pages=True) == {"threads": 1}
    assert bench_goals.torch_setting(1, True, 1) == {"threads": 1}
    assert seen[0]["THP_MEM_ALLOC_ENABLE"] == "1" and seen[1] is None

    calls = []

    def fake(repeats, pinned, epochs, huge_pages=False):
        calls.append(huge_pages)
        return {
            "seconds": {"mlp/full": 0.04, "mlp/trace": 0.02, "cnn/full": 0.2, "cnn/trace": 0.1},
            "threads": 1, "matmul": 1e11, "flops": {"full": 3.6e9, "trace": 1.0e9},
            "auto_trace": 0.01, "tutorial_trace": 4.0,
            "tracker": {"measure": 0.013, "kernel": 0.012, "measurements": 6, "threads": 1},
        }

    monkeypatch.setattr(bench_goals, "torch_setting", fake)
    assert bench_goals.main(["--quick", "--huge-pages"]) == 0
    assert calls == [True, True]
    assert "torch allocator: THP_MEM_ALLOC_ENABLE=1" in capsys.readouterr().out


def test_bench_ntk_goals_forwards_quick_and_huge_pages(monkeypatch):
    import bench_ntk

    forwarded = []
    monkeypatch.setattr(bench_goals, "main", lambda argv: forwarded.append(argv) or 0)
    assert bench_ntk.main(["--goals", "--quick", "--huge-pages", "--repeats", "2"]) == 0
    assert forwarded == [["--nt-python", "", "--repeats", "2", "--quick", "--huge-pages"]]
