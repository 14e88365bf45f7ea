"""TensorBoard: the tracker's records read back from the event file at their steps, the
figures as images, a missing tensorboard named, ``ntk-torch run --tensorboard``."""

from __future__ import annotations

import builtins
import sys

import pytest
import torch
import yaml
from torch import nn

from ntk_torch import cli
from ntk_torch.sinks import NullSink, open_sink, scalars
from ntk_torch.tracker import NTKTracker

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(log_dir):
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _train(tensorboard, run_dir=None, steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, every=2, progress=False, run_dir=run_dir,
                         tensorboard=tensorboard)
    with tracker.attach(optimizer):
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    return tracker


def test_scalars_flatten_a_record():
    record = {"step": 3, "final": True, "a": 1, "b": float("nan"), "c": {"x": 0.5}, "d": [2.0, None], "e": "s"}
    assert scalars(record) == {"a": 1.0, "c/x": 0.5, "d/0": 2.0}
    assert isinstance(open_sink(None), NullSink) and isinstance(open_sink("dir", main=False), NullSink)
    with pytest.raises(TypeError, match="tensorboard must be a torch.utils.tensorboard.SummaryWriter or a log"):
        open_sink(3)


def test_the_sink_writes_each_number_at_the_record_step(tmp_path):
    sink = open_sink(tmp_path / "tb")
    sink.write({"step": 0, "relative_change": 0.0, "layer_share": {"layers.0": 0.75}, "top_eigenvalues": [3.0, 1.0]})
    sink.write({"step": 7, "relative_change": 0.25, "velocity": 0.5, "final": True})
    sink.close(None)  # no run directory: no figures
    events = _events(tmp_path / "tb")
    assert [(e.step, e.value) for e in events.Scalars("ntk/relative_change")] == [(0, 0.0), (7, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("ntk/layer_share/layers.0")] == [(0, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("ntk/top_eigenvalues/1")] == [(0, 1.0)]
    assert "ntk/final" not in events.Tags()["scalars"] and not events.Tags()["images"]


@pytest.mark.slow
def test_records_are_scalars_at_their_optimizer_steps(tmp_path):
    tracker = _train(tmp_path / "tb")
    events = _events(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    for field in ("relative_change", "kernel_distance", "velocity", "effective_rank", "top_eigenvalues/0",
                  "predicted_train_loss", "probe_loss"):
        assert f"ntk/{field}" in tags, (field, sorted(tags))
    assert any(tag.startswith("ntk/layer_share/") for tag in tags)
    drift = events.Scalars("ntk/relative_change")
    assert [event.step for event in drift] == [record["step"] for record in tracker.records] == [0, 2, 4]
    assert [event.value for event in drift] == pytest.approx([r["relative_change"] for r in tracker.records])
    velocity = events.Scalars("ntk/velocity")  # None at step 0: no point there
    assert [event.step for event in velocity] == [2, 4]


@pytest.mark.slow
def test_figures_are_images_at_the_end_and_a_given_writer_stays_open(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    _train(writer, run_dir=tmp_path / "run")
    writer.add_scalar("mine", 1.0, 0)  # still the caller's, still open
    writer.close()
    events = _events(tmp_path / "tb")
    images = events.Tags()["images"]
    assert "ntk/figures/drift" in images, images
    assert {event.step for tag in images for event in events.Images(tag)} == {4}
    assert "mine" in events.Tags()["scalars"]


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"^TensorBoard logging needs .*pip install 'ntk-torch\[tensorboard\]'$"):
        open_sink(tmp_path / "tb")


@pytest.mark.slow
def test_run_command_logs_to_tensorboard(tmp_path, capsys):
    config = {
        "name": "tiny", "seed": 0,
        "data": {"name": "teacher", "options": {"n_train": 16, "n_test": 16, "input_dim": 3, "output_dim": 1}},
        "model": {"name": "mlp", "options": {"width": 8, "depth": 1}},
        "train": {"optimizer": "sgd", "lr": 0.1, "batch_size": None, "steps": 4, "loss": "mse"},
        "track": {"every": 2, "probe_size": 8, "mode": "trace", "keep_kernels": "none"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["run", str(path), "--out", str(tmp_path / "run"), "--no-progress", "--tensorboard", str(tmp_path / "tb")]
    assert cli.main(argv) == 0
    assert [event.step for event in _events(tmp_path / "tb").Scalars("ntk/relative_change")] == [0, 2, 4]
