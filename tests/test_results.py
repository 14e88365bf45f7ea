"""Machine-readable results: summary.json written at close, Run.to_csv / to_dataframe, and
``ntk-torch run/predict/sweep --json``."""

from __future__ import annotations

import builtins
import csv
import json
import math

import pytest
import torch
import yaml
from torch import nn

import ntk_torch
from ntk_torch import cli
from ntk_torch.runs import RunWriter, load_run
from ntk_torch.runs.summary import SUMMARY_FILE
from ntk_torch.tracker import NTKTracker

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "teacher", "options": {"n_train": 24, "n_test": 24, "input_dim": 4, "output_dim": 1}},
    "model": {"name": "mlp", "options": {"width": 16, "depth": 1, "parametrization": "ntk", "activation": "tanh"}},
    "train": {"optimizer": "sgd", "lr": 0.5, "batch_size": None, "steps": 4, "loss": "mse"},
    "track": {"every": 2, "probe_size": 8, "mode": "trace", "keep_kernels": "none"},
    "sweep": {"parameter": "model.options.width", "values": [8, 16]},
}


def _written(tmp_path):
    writer = RunWriter(tmp_path / "run", {"config": {"every": 5}, "model": {"class": "MLP", "summary": "MLP(...)"}})
    writer.append({"step": 0, "loss": 2.0, "layer_share": {"a": 0.25}, "top_eigenvalues": [3.0, 1.0], "note": "x"})
    writer.append({"step": 5, "loss": 1.5, "layer_share": {"a": float("nan")}, "top_eigenvalues": [2.0]})
    writer.append({"step": 10, "loss": float("inf"), "velocity": None})
    writer.close("completed")
    return load_run(tmp_path / "run")


def test_summary_holds_final_values_config_and_versions(tmp_path):
    run = _written(tmp_path)
    text = (run.path / SUMMARY_FILE).read_text()
    summary = json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in strict JSON"))
    assert summary == run.summary
    assert summary["status"] == "completed" and summary["reason"] is None and summary["run"] == str(run.path)
    assert (summary["records"], summary["first_step"], summary["last_step"]) == (3, 0, 10)
    # the last FINITE value of each numeric field, and the step it was measured at
    assert summary["final"] == {"loss": 1.5, "layer_share.a": 0.25, "top_eigenvalues": [2.0]}
    assert summary["final_step"] == {"loss": 5, "layer_share.a": 0, "top_eigenvalues": 5}
    assert summary["config"] == {"every": 5} and summary["model"] == {"class": "MLP"}
    assert summary["versions"] == {"ntk_torch": ntk_torch.__version__, "torch": torch.__version__,
                                   "python": summary["versions"]["python"]}
    assert run.problems == []


@pytest.mark.slow
def test_a_tracked_run_writes_its_summary_at_close(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, every=2, progress=False, run_dir=tmp_path / "r")
    with tracker.attach(optimizer):
        for _ in range(4):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    summary = load_run(tmp_path / "r").summary
    assert summary["status"] == "completed" and summary["last_step"] == 4
    assert summary["final"]["relative_change"] == tracker.records[-1]["relative_change"]
    assert summary["config"]["every"] == 2 and summary["model"]["class"] == "Sequential"


def test_to_csv_writes_every_column_exactly(tmp_path):
    run = _written(tmp_path)
    path = run.to_csv(tmp_path / "out.csv")
    assert path == (tmp_path / "out.csv").resolve()
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["step", "loss", "layer_share.a", "top_eigenvalues.0", "top_eigenvalues.1", "note",
                             "velocity"]
    assert [row["step"] for row in rows] == ["0", "5", "10"]
    assert [row["loss"] for row in rows] == ["2.0", "1.5", "inf"]
    assert rows[1]["layer_share.a"] == "" and rows[1]["top_eigenvalues.1"] == "" and rows[0]["note"] == "x"
    third = 0.1 + 0.2  # floats round-trip exactly
    writer = RunWriter(tmp_path / "exact", {})
    writer.append({"step": 0, "v": third})
    writer.close()
    assert float(next(csv.DictReader(load_run(tmp_path / "exact").to_csv(tmp_path / "e.csv").open()))["v"]) == third


def test_to_csv_refuses_a_directory_or_a_missing_parent(tmp_path):
    run = _written(tmp_path)
    with pytest.raises(ValueError, match="is a directory; give a CSV file name"):
        run.to_csv(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        run.to_csv(tmp_path / "missing" / "out.csv")
    with pytest.raises(TypeError, match="path must be a path"):
        run.to_csv(3)


def test_to_dataframe_matches_the_csv_columns(tmp_path):
    pandas = pytest.importorskip("pandas")
    run = _written(tmp_path)
    frame = run.to_dataframe()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame.columns) == ["step", "loss", "layer_share.a", "top_eigenvalues.0", "top_eigenvalues.1", "note",
                                   "velocity"]
    assert frame["step"].tolist() == [0, 5, 10] and frame["loss"].iloc[2] == math.inf
    assert math.isnan(frame["layer_share.a"].iloc[1])


def test_to_dataframe_without_pandas_names_the_extra(tmp_path, monkeypatch):
    run = _written(tmp_path)
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "pandas", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match=r"pip install 'ntk-torch\[pandas\]'"):
        run.to_dataframe()


def test_an_unreadable_summary_is_a_problem_not_a_crash(tmp_path):
    run = _written(tmp_path)
    (run.path / SUMMARY_FILE).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="summary.json is unreadable"):
        assert load_run(run.path).summary is None


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _json_stdout(capsys):
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_predict_json_prints_the_forecast_alone(tiny_config, tmp_path, capsys):
    assert cli.main(["predict", str(tiny_config), "--out", str(tmp_path / "p"), "--json"]) == 0
    result, err = _json_stdout(capsys)
    assert "what the kernel at initialisation predicts" in err  # the table went to stderr
    assert result["config"] == "tiny" and result["steps"][0] == 0
    assert len(result["predicted"]["predicted_train_loss"]) == len(result["steps"])
    assert result["max_learning_rate"] > 0 and result["versions"]["torch"] == torch.__version__


@pytest.mark.slow
def test_run_and_sweep_json(tiny_config, tmp_path, capsys):
    assert cli.main(["run", str(tiny_config), "--out", str(tmp_path / "r"), "--no-progress", "--json"]) == 0
    result, err = _json_stdout(capsys)
    assert result == {**json.loads((tmp_path / "r" / SUMMARY_FILE).read_text()), "files": result["files"]}
    assert result["status"] == "completed" and result["last_step"] == 4 and "relative_change" in result["final"]
    assert any(name.endswith("report.html") for name in result["files"]) and "figures in" in err

    overrides = ["--set", "sweep.seeds=2"]
    assert cli.main(["sweep", str(tiny_config), "--out", str(tmp_path / "s"), "--no-progress", "--json",
                     *overrides]) == 0
    result, err = _json_stdout(capsys)
    assert result["parameter"] == "model.options.width" and [p["value"] for p in result["points"]] == [8, 16]
    spread = result["points"][0]["spread"]["relative_change"]
    assert len(spread["seeds"]) == 2 and spread["std"] is not None
    assert spread["mean"] == pytest.approx(sum(spread["seeds"]) / 2)
    slope = result["slopes"]["relative_change"]
    assert slope["points"] == 2 and slope["reliable"] is False and "caveat" in err
