"""The scaling benchmark's fit and the vs-neural-tangents table (smoke tests, not timings)."""

import math
import sys

from ntk_torch import cli

if str(cli.SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(cli.SCRIPTS_DIR))
import bench_scaling  # noqa: E402
import bench_vs_nt  # noqa: E402


def test_exponent_is_the_log_log_slope():
    xs = [1024, 2048, 4096, 8192]
    assert math.isclose(bench_scaling.exponent(xs, [3.0 * x ** 2 for x in xs]), 2.0)
    assert math.isclose(bench_scaling.exponent(xs, [5.0 * x ** 1.5 for x in xs]), 1.5)
    assert bench_scaling.exponent([1024], [1.0]) is None  # one point: no slope


def test_vs_nt_table_without_neural_tangents(monkeypatch, capsys):
    """Without --nt-python the table still prints, the NT cells marked missing."""
    calls = []

    def fake(modes, repeats, pinned):
        calls.append(pinned)
        return {"mlp/trace": 0.5, "cnn/trace": 0.25}, 1 if pinned else 2

    monkeypatch.setattr(bench_vs_nt, "structured_seconds", fake)
    assert bench_vs_nt.main(["--quick"]) == 0
    table = capsys.readouterr().out
    assert calls == [True, False]
    assert "load average" in table and "| mlp N=128 | trace | 0.5000 | – | – | 0.5000 | – | – |" in table
