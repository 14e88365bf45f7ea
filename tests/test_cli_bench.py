"""The ``ntk-torch bench`` command and its table (a smoke test on tiny cases, not a timing)."""

import sys

import pytest
import torch
from torch import nn

from ntk_torch import cli
from ntk_torch.kernel import METHODS

# the module `ntk-torch bench` imports from the checkout's scripts/, so the cases patched here are the ones it runs
if str(cli.SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(cli.SCRIPTS_DIR))
import bench_ntk as bench  # noqa: E402


@pytest.fixture
def tiny_cases(monkeypatch):
    def tiny_mlp(device="cpu"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        return bench.Case("mlp", "tiny MLP, N=5", model, torch.randn(5, 4))

    monkeypatch.setitem(bench.CASES, "mlp", tiny_mlp)


def test_bench_prints_a_markdown_table(tiny_cases, capsys, tmp_path):
    out = tmp_path / "table.md"
    assert cli.main(["bench", "--cases", "mlp", "--modes", "trace", "--repeats", "1", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "torch " + torch.__version__ in table and "threads" in table
    rows = [line for line in table.splitlines() if line.startswith("| tiny MLP")]
    engines = {m for m in METHODS if m != "auto"}
    assert {row.split("|")[3].strip() for row in rows} == engines | {"tutorial baseline"}
    assert out.read_text().strip() == table.strip()


def test_tutorial_baseline_agrees_with_the_engines():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    from ntk_torch import empirical_ntk

    for mode in ("full", "trace", "diagonal"):
        torch.testing.assert_close(bench.tutorial_baseline(model, x, x, mode), empirical_ntk(model, x, mode=mode))


def test_bench_rejects_unknown_names(tiny_cases):
    with pytest.raises(SystemExit, match="--methods takes a comma-separated list"):
        cli.main(["bench", "--methods", "magic"])
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--repeats", "x"])
    assert info.value.code == 2


def test_quick_defaults_to_auto(tiny_cases, capsys):
    cli.main(["bench", "--quick", "--cases", "mlp", "--no-baseline"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny MLP")]
    assert [row.split("|")[2].strip() for row in rows] == ["full", "trace"]
    assert all(row.split("|")[3].strip() == "auto" for row in rows)


def test_bench_outside_a_checkout_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "SCRIPTS_DIR", tmp_path / "scripts")
    assert cli.main(["bench", "--quick"]) == 2
    assert capsys.readouterr().err == (
        "ntk-torch: error: the benchmark ships with the source repository; "
        "run python scripts/bench_ntk.py from a checkout\n"
    )


def test_the_bert_like_benchmark_model_is_covered_and_exact():
    """The benchmark's BERT-like encoder, small: every parameter has a rule (attention
    projections through F.linear, positions looked up with shared ids) and the kernel is
    the Jacobian engine's."""
    from ntk_torch.kernel import explain
    from ntk_torch import empirical_ntk

    torch.manual_seed(0)
    model = bench.BertLikeEncoder(vocab=50, positions=8, d_model=8, heads=2, feedforward=12)
    tokens = torch.randint(1, 50, (4, 6))
    assert explain(model, tokens, mode="trace", method="structured").fallback == {}
    structured = empirical_ntk(model, tokens, mode="trace", method="structured", dtype=torch.float64)
    jacobian = empirical_ntk(model, tokens, mode="trace", method="jacobian", dtype=torch.float64)
    torch.testing.assert_close(structured, jacobian, rtol=1e-10, atol=1e-12)
