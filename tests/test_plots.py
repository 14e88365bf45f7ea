"""Figures from run directories: every figure from a real tracked run, missing data,
overlays, heatmap sorting, power-law fits."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from torch import nn

from ntk_torch import plots
from ntk_torch.plots.series import DRIFT_LABELS
from ntk_torch.runs import RunWriter, load_run
from ntk_torch.tracker import NTKTracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SINGLE_AXES = [spec for spec in plots.FIGURES if spec.single_axes]


# --------------------------------------------------------------------------- run builders


def synthetic_run(
    path,
    *,
    steps=(0, 1, 2, 4, 8, 16, 32),
    predictions=True,
    labels=(2, 0, 1, 0, 2, 1, 1, 0),
    groups=("layers.0", "layers.1", "head"),
    kernel_shape=None,
    status="completed",
):
    """A run directory with every record field, written by ``RunWriter``.

    Drift grows as sqrt(step); the train loss decays as 0.8 exp(-step / 10) and its
    prediction lags by 10%; kernels (``arange`` values, so positions are recognisable)
    are kept at the first and last step.
    """
    n = len(labels) if labels is not None else 8
    meta = {"model": {"class": "MLP", "summary": "MLP(\n  (0): Linear()\n)", "num_params": 123},
            "config": {"probe_size": n, "every": 1, "mode": "trace", "loss": "cross_entropy"},
            "probe": {"size": n, "indices": list(range(n)), "train_size": 100}}
    if labels is not None:
        meta["probe"]["labels"] = list(labels)
    if predictions:
        meta["prediction"] = {"points": 64, "approximate": False, "kernel_mode": "full", "lr": 0.1, "momentum": 0.0}
    with RunWriter(path, meta, keep_kernels="all") as writer:
        for i, step in enumerate(steps):
            share = np.array([1.0 + i, 2.0, 3.0])[: len(groups)]
            share = share / share.sum()
            train_loss = 0.8 * math.exp(-step / 10)
            record = {
                "step": step, "time": 1.7e9 + step, "measure_time": 0.01, "finite": True,
                "trace": 10.0 + step, "frobenius": 5.0 + step,
                "top_eigenvalues": [4.0 / (k + 1) * (1 + 0.01 * step) for k in range(5)],
                "effective_rank": 3.0 + 0.01 * step,
                "relative_change": 0.01 * math.sqrt(step), "kernel_distance": 1e-4 * step,
                "velocity": None if step == 0 else 1e-4 / (1 + step),
                "target_alignment": 0.2 + 0.01 * step,
                "layer_share": dict(zip(groups, share.tolist())),
                "param_distance": 0.001 * step,
                "probe_loss": train_loss * 1.05, "probe_accuracy": 0.5 + 0.01 * step,
                "test_loss": train_loss + 0.1, "test_accuracy": 0.45 + 0.01 * step,
                "train_loss": train_loss, "train_accuracy": 0.5 + 0.012 * step,
            }
            if predictions:
                record.update({
                    "predicted_train_loss": 0.8 * math.exp(-step / 11),
                    "predicted_test_loss": 0.8 * math.exp(-step / 11) + 0.12,
                    "predicted_train_accuracy": 0.5 + 0.011 * step,
                    "predicted_test_accuracy": 0.45 + 0.009 * step,
                    "linearisation_gap": abs(train_loss - 0.8 * math.exp(-step / 11)) / 0.8,
                })
            writer.append(record)
            if step in (steps[0], steps[-1]):
                shape = kernel_shape or (n, n)
                K = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 1.0
                writer.save_kernel(step, K * (1 + step))
        if status is not None:
            writer.close(status=status)
    return load_run(path)


def tracked_run(path):
    """A real run: a tiny MLP trained a few SGD steps under ``NTKTracker``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    xt = torch.randn(24, 5, generator=generator)
    yt = (xt[:, 0] > 0).long() + (xt[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = NTKTracker(model, (x, y), test=(xt, yt), probe_size=10, every=2, progress=False,
                         run_dir=path, keep_kernels="all")
    with tracker.attach(optimizer):
        for _ in range(6):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return load_run(path)


_TRACKED = {}


def shared_tracked_run(tmp_path_factory):
    """One tracked run per test session (training it is the slow part), shared by the
    plot and report tests; tests must not modify it."""
    if "run" not in _TRACKED:
        _TRACKED["run"] = tracked_run(tmp_path_factory.mktemp("tracked") / "mlp")
    return _TRACKED["run"]


@pytest.fixture
def real_run(tmp_path_factory):
    return shared_tracked_run(tmp_path_factory)


@pytest.fixture
def run(tmp_path):
    return synthetic_run(tmp_path / "synthetic")


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


# --------------------------------------------------------------------------- every figure, from disk


@pytest.mark.slow
def test_save_all_writes_every_supported_figure_from_a_tracked_run(real_run, tmp_path):
    paths = plots.save_all(real_run.path, tmp_path / "figures")

    names = {path.stem for path in paths}
    assert {"overview", "drift", "velocity", "eigenvalues", "layer_share", "target_alignment",
            "predicted_vs_actual_loss", "predicted_vs_actual_accuracy", "kernel_heatmaps"} <= names
    assert names <= {"overview"} | {spec.name for spec in plots.FIGURES}
    assert sorted(path.suffix for path in paths) == sorted([".png", ".svg"] * len(names))
    for path in paths:
        assert path.is_file() and path.parent == tmp_path / "figures"
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_MAGIC)
        else:
            root = ElementTree.parse(path).getroot()
            assert root.tag == "{http://www.w3.org/2000/svg}svg"


@pytest.mark.parametrize("fmt", ["svg", "pdf", "png"])
def test_a_figure_saved_again_gives_the_identical_file(run, tmp_path, fmt):
    """No creation date, and SVG's clip-path and marker ids from a fixed salt: rerunning
    ``ntk-torch plot`` leaves a figure file unchanged."""
    from matplotlib.figure import Figure

    files = []
    for attempt in ("first", "again"):
        drawn = plots.drift(run)
        figure = drawn if isinstance(drawn, Figure) else drawn.figure
        (tmp_path / attempt).mkdir()
        files.append(plots.save_figure(figure, tmp_path / attempt / f"drift.{fmt}").read_bytes())
    assert files[0] == files[1]
    assert b"CreationDate" not in files[0] and b"<dc:date>" not in files[0]  # equal within a second alone


def test_each_figure_is_laid_out_once_for_all_its_formats(tmp_path, monkeypatch):
    """The constrained layout runs for the first file only; the later formats keep its
    positions (a second layout pass would move the axes and cost as much again)."""
    from matplotlib.figure import Figure

    from ntk_torch.plots import saving

    figure = Figure(figsize=(6, 3), layout="constrained")
    for ax in figure.subplots(1, 2):
        ax.plot(np.arange(50), np.sqrt(np.arange(50)))
        ax.set_title("a title"), ax.set_xlabel("optimizer step"), ax.set_ylabel("relative change")
    positions, save = [], saving.save_figure

    def recording(figure, path):
        written = save(figure, path)
        positions.append([ax.get_position().bounds for ax in figure.axes])
        return written

    monkeypatch.setattr(saving, "save_figure", recording)
    paths = saving._save_formats(figure, tmp_path / "drift", ("png", "svg", "pdf"))
    assert [path.name for path in paths] == ["drift.png", "drift.svg", "drift.pdf"]
    assert all(path.stat().st_size > 0 for path in paths)
    assert positions[0] == positions[1] == positions[2]


@pytest.mark.slow
def test_save_all_formats_are_checked(run, tmp_path):
    with pytest.raises(ValueError, match="formats must be"):
        plots.save_all(run, tmp_path / "figures", formats=("png", "bmpx"))
    assert not (tmp_path / "figures").exists()  # checked before anything is drawn
    path = plots.save_figure(plots.velocity(run).figure, tmp_path / "velocity.pdf")
    assert path.read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("spec", SINGLE_AXES, ids=lambda spec: spec.name)
def test_each_figure_draws_into_a_given_axes(spec, real_run, run):
    figure = Figure()
    ax = figure.add_subplot()
    source = run if spec.name == "linearisation_gap" or not spec.available(real_run) else real_run
    assert spec.available(source)
    assert spec.draw(source, ax) is ax
    assert ax.get_lines() or ax.collections, f"{spec.name} drew nothing"
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_functions_without_an_axes_make_their_own_figure(run):
    ax = plots.drift(run)
    assert isinstance(ax, Axes) and isinstance(ax.figure, Figure)
    assert ax.get_xscale() == "symlog" and ax.get_yscale() == "log"


def test_heatmaps_draw_into_given_axes(real_run):
    figure = Figure()
    axes = figure.subplots(1, 2)
    assert plots.kernel_heatmaps(real_run, axes=axes) is figure
    assert [len(ax.images) for ax in axes] == [1, 1]
    with pytest.raises(ValueError, match="one per step"):
        plots.kernel_heatmaps(real_run, axes=axes[:1])


# --------------------------------------------------------------------------- content


def test_predicted_dashed_actual_solid_same_colour_per_split(run):
    ax = plots.predicted_vs_actual(run)
    lines = lines_by_label(ax)
    for split in ("train", "test"):
        actual, predicted = lines[f"{split} (actual)"], lines[f"{split} (predicted)"]
        assert actual.get_linestyle() == "-" and predicted.get_linestyle() == "--"
        assert to_rgba(actual.get_color()) == to_rgba(predicted.get_color())
    assert to_rgba(lines["train (actual)"].get_color()) != to_rgba(lines["test (actual)"].get_color())
    np.testing.assert_allclose(lines["train (actual)"].get_ydata(), 0.8 * np.exp(-run.steps / 10))
    assert "Predicted (dashed) vs actual (solid) loss" in ax.get_title()
    assert "64 training points" in ax.get_title()

    accuracy = plots.predicted_vs_actual(run, metric="accuracy")
    assert accuracy.get_ylim() == pytest.approx((-0.02, 1.02))
    assert set(lines_by_label(accuracy)) == {"train (actual)", "train (predicted)", "test (actual)", "test (predicted)"}


def test_run_without_predictions_shows_actual_only_and_says_so(tmp_path):
    run = synthetic_run(tmp_path / "plain", predictions=False)
    ax = plots.predicted_vs_actual(run)
    assert "Actual loss only" in ax.get_title() and "no kernel prediction" in ax.get_title()
    assert all(line.get_linestyle() == "-" for line in ax.get_lines())
    assert set(lines_by_label(ax)) == {"train (actual)", "test (actual)"}

    names = {spec.name for spec, _ in plots.figures(run)}
    assert "predicted_vs_actual_loss" in names  # still drawn (and saved): the actual curves
    assert "linearisation_gap" not in names


def test_probe_loss_stands_in_when_the_run_has_no_train_loss(tmp_path):
    path = tmp_path / "old"
    with RunWriter(path, {}) as writer:
        for step in (0, 5, 10):
            writer.append({"step": step, "probe_loss": 1.0 / (1 + step), "test_loss": 1.2 / (1 + step)})
    run = load_run(path)
    assert set(lines_by_label(plots.predicted_vs_actual(run))) == {"probe (actual)", "test (actual)"}
    # only the loss figure has data: no drift, no kernels, no accuracy
    assert [spec.name for spec, _ in plots.figures(run)] == ["predicted_vs_actual_loss"]


def test_missing_columns_leave_panels_empty_with_a_message(tmp_path):
    path = tmp_path / "bare"
    with RunWriter(path, {}) as writer:
        writer.append({"step": 0, "trace": 1.0})
    run = load_run(path)
    assert plots.figures(run) == []
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.overview(run)
    ax = plots.drift(run)
    assert not ax.get_lines()
    assert any("no kernel drift" in text.get_text() for text in ax.texts)
    with pytest.raises(ValueError, match="no saved kernels"):
        plots.kernel_heatmaps(run)


def test_drift_leaves_out_step_zero_on_its_log_axes(run):
    ax = plots.drift(run)
    lines = ax.get_lines()
    assert len(lines) == 2 and all(line.get_linestyle() in ("-", "--") for line in lines)
    for line in lines:
        assert 0 not in line.get_xdata()
        assert (np.asarray(line.get_ydata()) > 0).all()
    linear = plots.drift(run, xscale="linear", metrics=["relative_change"])
    np.testing.assert_array_equal(linear.get_lines()[0].get_xdata(), run.steps[1:])
    logx = plots.target_alignment(run, xscale="log")
    assert logx.get_xscale() == "log"
    np.testing.assert_array_equal(logx.get_lines()[0].get_xdata(), run.steps[1:])  # no log 0
    with pytest.raises(ValueError, match="xscale"):
        plots.drift(run, xscale="loglog")
    with pytest.raises(ValueError, match="metrics"):
        plots.drift(run, metrics=["trace"])


def test_nonfinite_steps_are_skipped_and_marked(tmp_path):
    path = tmp_path / "nan"
    with RunWriter(path, {}) as writer:
        writer.append({"step": 0, "finite": True, "relative_change": 0.0, "velocity": None})
        writer.append({"step": 1, "finite": True, "relative_change": 0.1, "velocity": 0.1})
        writer.append({"step": 2, "finite": False, "nonfinite_groups": ["0"], "relative_change": None})
        writer.append({"step": 3, "finite": True, "relative_change": 0.3, "velocity": 0.05})
    ax = plots.drift(load_run(path), metrics=["relative_change"])
    [drawn, marker] = ax.get_lines()
    np.testing.assert_array_equal(drawn.get_xdata(), [1, 3])  # step 0 is zero, step 2 is None
    assert marker.get_label() == "non-finite kernel" and marker.get_xdata()[0] == 2


def test_eigenvalues_one_line_per_index(run):
    ax = plots.eigenvalues(run)
    assert [line.get_label() for line in ax.get_lines()] == ["λ₁", "λ₂", "λ₃", "λ₄", "λ₅"]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), 2.0 * (1 + 0.01 * run.steps))
    assert len(plots.eigenvalues(run, k=2).get_lines()) == 2


def test_layer_share_stacks_groups_with_dotted_names(run):
    ax = plots.layer_share(run)
    [legend] = [ax.get_legend()]
    assert [text.get_text() for text in legend.get_texts()] == ["layers.0", "layers.1", "head"]
    assert len(ax.collections) == 3
    top = ax.collections[-1].get_paths()[0].vertices[:, 1]
    assert top.max() == pytest.approx(1.0)  # shares stack to 1


def test_layer_share_merges_small_groups_into_other(tmp_path):
    path = tmp_path / "many"
    with RunWriter(path, {}) as writer:
        shares = {f"g{i}": (i + 1) / 55 for i in range(10)}
        writer.append({"step": 0, "layer_share": shares})
        writer.append({"step": 1, "layer_share": shares})
    ax = plots.layer_share(load_run(path), max_groups=4)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["g7", "g8", "g9", "other (7 groups)"]


# --------------------------------------------------------------------------- overlays


def test_compare_overlays_runs_one_colour_each(tmp_path):
    a = synthetic_run(tmp_path / "width64")
    b = synthetic_run(tmp_path / "width256", predictions=False)
    ax = plots.drift([a, b])
    lines = lines_by_label(ax)
    assert set(lines) == {f"{name}: {DRIFT_LABELS[m]}" for name in ("width64", "width256")
                          for m in ("relative_change", "kernel_distance")}
    colours = {name: {to_rgba(l.get_color()) for k, l in lines.items() if k.startswith(name)}
               for name in ("width64", "width256")}
    assert all(len(c) == 1 for c in colours.values()) and colours["width64"] != colours["width256"]

    labelled = plots.target_alignment([a, b], label=["narrow", "wide"])
    assert [line.get_label() for line in labelled.get_lines()] == ["narrow", "wide"]
    with pytest.raises(ValueError, match="one per run"):
        plots.velocity([a, b], label="only one")

    figure = plots.compare([a, b])
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 4  # drift, velocity, alignment, linearisation gap (run a has one)
    assert all(len(ax.get_legend().get_texts()) >= 2 for ax in visible[:3])


# --------------------------------------------------------------------------- heatmaps


def test_heatmap_sorts_examples_by_class(run):
    labels = np.array(run.meta["probe"]["labels"])
    order, sorted_labels = plots.class_order(run)
    assert order.tolist() == [1, 3, 7, 2, 5, 6, 0, 4]  # stable: probe order within a class
    assert sorted_labels.tolist() == sorted(labels.tolist())

    figure = plots.kernel_heatmaps(run)
    first, last = figure.axes[:2]
    assert first.get_title().startswith("step 0") and last.get_title().startswith("step 32")
    K = run.kernel(0)
    cosine = K / np.sqrt(np.outer(np.diagonal(K), np.diagonal(K)))
    np.testing.assert_allclose(first.images[0].get_array(), cosine[np.ix_(order, order)])
    assert [t.get_text() for t in first.get_xticklabels()] == ["0", "1", "2"]
    assert "sorted by class" in figure._suptitle.get_text()
    # both panels on one colour scale, centred at zero
    assert first.images[0].get_clim() == last.images[0].get_clim()
    assert first.images[0].get_clim() == (-1.0, 1.0)


def test_kernel_cosine():
    K = np.array([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(plots.kernel_cosine(K), [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="square"):
        plots.kernel_cosine(np.zeros((2, 3)))


def test_heatmap_without_labels_keeps_probe_order(tmp_path):
    run = synthetic_run(tmp_path / "regression", labels=None)
    figure = plots.kernel_heatmaps(run)
    K = run.kernel(0)
    np.testing.assert_allclose(figure.axes[0].images[0].get_array(), plots.kernel_cosine(K))
    assert "probe order" in figure._suptitle.get_text()


def test_full_and_diagonal_kernels_are_shown_as_their_trace(tmp_path):
    K = np.random.default_rng(0).normal(size=(4, 4, 3, 3))
    np.testing.assert_allclose(plots.display_kernel(K), sum(K[:, :, o, o] for o in range(3)))
    np.testing.assert_allclose(plots.display_kernel(K[..., 0]), K[..., 0].sum(axis=2))
    with pytest.raises(ValueError, match="shape"):
        plots.display_kernel(np.zeros((2, 2, 3, 4)))
    run = synthetic_run(tmp_path / "full", labels=(1, 0, 1, 0), kernel_shape=(4, 4, 2, 2))
    assert plots.kernel_heatmaps(run).axes[0].images[0].get_array().shape == (4, 4)


# --------------------------------------------------------------------------- width sweeps


@pytest.mark.parametrize("slope, coefficient", [(-0.5, 3.0), (-1.0, 0.2), (2.0, 1.0)])
def test_fit_loglog_slope_recovers_exact_power_laws(slope, coefficient):
    x = np.array([16.0, 64.0, 256.0, 1024.0])
    fit = plots.fit_loglog_slope(x, coefficient * x ** slope)
    assert fit.slope == pytest.approx(slope, abs=1e-12)
    assert fit.coefficient == pytest.approx(coefficient, rel=1e-12)


@pytest.mark.parametrize("x, y, message", [
    ([1.0], [1.0], "at least 2 points"),
    ([1.0, 2.0], [1.0], "same length"),
    ([1.0, -2.0], [1.0, 1.0], "positive"),
    ([1.0, 2.0], [1.0, float("nan")], "positive and finite"),
    ([4.0, 4.0], [1.0, 2.0], "distinct"),
])
def test_fit_loglog_slope_rejects_bad_input(x, y, message):
    with pytest.raises(ValueError, match=message):
        plots.fit_loglog_slope(x, y)


def test_width_sweep_shows_fitted_slopes_on_loglog_axes():
    widths = [32, 128, 512, 2048]
    results = [(w, 2.0 * w ** -0.5, 0.5 / w if w != 128 else None) for w in widths]
    ax = plots.width_sweep(results)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any(t.startswith("relative change") and "slope -0.50" in t for t in legend)
    assert any(t.startswith("linearisation gap") and "slope -1.00" in t for t in legend)
    gap = next(line for line in ax.get_lines() if line.get_label().startswith("linearisation gap"))
    np.testing.assert_array_equal(gap.get_xdata(), [32, 512, 2048])  # the None point is left out
    with pytest.raises(ValueError, match="width, relative_change"):
        plots.width_sweep([(32, 0.1)])
    assert not any("infinite-width" in t for t in legend)


def test_width_sweep_draws_the_distance_from_infinite_width_when_given():
    results = [(w, 2.0 * w ** -0.5, 0.5 / w, 3.0 * w ** -0.5) for w in (32, 128, 512)]
    ax = plots.width_sweep(results)
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any(t.startswith("distance of K₀ from the infinite-width NTK") and "slope -0.50" in t for t in legend)
    assert "K₀ at initialisation" in ax.get_ylabel()
