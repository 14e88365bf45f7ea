"""Every figure's caption (``plots.FIGURES``, shown under the figure in reports) says what
the figure draws: each claim a caption makes is checked against the figure's artists,
drawn from a small tracked run (and, for the cases it lacks, a run written by RunWriter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from torch import nn

from ntk_torch import plots
from ntk_torch.runs import RunWriter, load_run
from ntk_torch.tracker import NTKTracker

from test_plots import lines_by_label, shared_tracked_run, synthetic_run

SPECS = {spec.name: spec for spec in plots.FIGURES}
COSINE_FORMULA = r"$K_{ij}\, /\, \sqrt{K_{ii} K_{jj}}$"


@pytest.fixture
def real_run(tmp_path_factory):
    return shared_tracked_run(tmp_path_factory)


def draw(name, run):
    """The figure ``FIGURES[name]`` draws for ``run`` (the run must have its data)."""
    spec = SPECS[name]
    assert spec.available(run), f"{run.path} has no data for {name}"
    return spec.draw(run, None)


def caption(name):
    return SPECS[name].caption


def luminance(colour):
    red, green, blue = to_rgb(colour)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def marked_points(line):
    """The (x, y) data of a line where it draws a marker."""
    assert line.get_marker() not in (None, "None", "", " "), line.get_label()
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    every = line.get_markevery()
    return (x, y) if every is None else (x[every], y[every])


def assert_one_colour_per_split(lines):
    """Lines labelled "<split> (<kind>)": one colour within a split, another per split."""
    colours = {}
    for label, line in lines.items():
        colours.setdefault(label.split(" (")[0], set()).add(to_rgb(line.get_color()))
    assert all(len(found) == 1 for found in colours.values()), colours
    assert len({found.pop() for found in colours.values()}) == len(colours)


# --------------------------------------------------------------------------- every caption is checked


CHECKED = {
    "predicted_vs_actual_loss", "predicted_vs_actual_accuracy", "linearisation_gap", "drift",
    "velocity", "eigenvalues", "layer_share", "target_alignment", "kernel_heatmaps",
}
"""The figures whose captions the tests below check, one test (or more) each."""


def test_every_figure_has_its_caption_checked():
    assert set(SPECS) == CHECKED


Y_SCALES = {"on a log y axis": "log", "on a linear y axis": "linear", "on a y axis from 0 to 1": "linear"}
"""Phrases captions use for the y axis, and the scale each means."""


@pytest.mark.parametrize(
    "spec", [s for s in plots.FIGURES if any(phrase in s.caption for phrase in Y_SCALES)], ids=lambda s: s.name
)
def test_a_caption_naming_a_y_scale_matches_the_figure(spec, real_run):
    [scale] = {scale for phrase, scale in Y_SCALES.items() if phrase in spec.caption}
    ax = draw(spec.name, real_run)
    assert ax.get_yscale() == scale
    if "y axis from 0 to 1" in spec.caption:
        low, high = ax.get_ylim()
        assert -0.05 <= low <= 0 and 1 <= high <= 1.05


# --------------------------------------------------------------------------- predictions


def test_loss_caption_solid_actual_dashed_prediction_one_colour_per_split(real_run, tmp_path):
    assert "loss (solid)" in caption("predicted_vs_actual_loss") and "(dashed)" in caption("predicted_vs_actual_loss")
    ax = draw("predicted_vs_actual_loss", real_run)
    lines = lines_by_label(ax)
    assert set(lines) == {"train (actual)", "train (predicted)", "test (actual)", "test (predicted)"}
    for label, line in lines.items():
        assert line.get_linestyle() == ("--" if "predicted" in label else "-")
    assert_one_colour_per_split(lines)
    np.testing.assert_allclose(lines["test (actual)"].get_ydata(), real_run.metrics["test_loss"])
    # "drawn at every step up to 1000 (the kernel forecast)": the run's dense forecast
    dense = real_run.dense_forecast
    assert real_run.meta["forecast"]["kind"] == "kernel"
    assert lines["train (predicted)"].get_xdata().tolist() == dense.steps.tolist() == list(range(7))
    np.testing.assert_allclose(lines["train (predicted)"].get_ydata(), dense.columns["predicted_train_loss"])
    # "both curves have a marker at each measurement": there, the recorded values
    for label, line in lines.items():
        x, y = marked_points(line)
        assert x.tolist() == real_run.steps.tolist(), label
        column = "predicted_" + label.split(" ")[0] + "_loss" if "predicted" in label else label.split(" ")[0] + "_loss"
        np.testing.assert_allclose(y, real_run.metrics[column])
    assert ax.get_xscale() == "symlog" and ax.xaxis.get_transform().linthresh == 1.0  # "linear below step 1"

    # "train (the probe set when the run has no train loss)"
    path = tmp_path / "probe_only"
    with RunWriter(path, {}) as writer:
        for step in (0, 5, 10):
            writer.append({"step": step, "probe_loss": 1.0 / (1 + step), "test_loss": 1.2 / (1 + step)})
    assert set(lines_by_label(draw("predicted_vs_actual_loss", load_run(path)))) == {"probe (actual)", "test (actual)"}


def test_loss_caption_the_twin_at_log_spaced_steps_and_the_measurements(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=generator)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = NTKTracker(model, (x, y), test=(x[:10], y[:10]), probe_size=8, every=10, progress=False,
                         run_dir=tmp_path / "twin")
    with tracker.attach(optimizer):
        for step in range(25):
            batch = slice((step * 8) % 40, (step * 8) % 40 + 8)
            tracker.observe(x[batch], y[batch])
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    run = load_run(tmp_path / "twin")
    ax = draw("predicted_vs_actual_loss", run)
    lines = lines_by_label(ax)
    log_spaced = [0, 1, 2, 3, 4, 6, 8, 11, 16, 23]
    assert lines["train (predicted)"].get_xdata().tolist() == sorted(set(log_spaced) | {10, 20, 25})
    assert marked_points(lines["train (predicted)"])[0].tolist() == [0, 10, 20, 25] == run.steps.tolist()
    assert "linearised twin trained with Adam on observed minibatches" in ax.get_title()


def test_loss_caption_log_y_axis_exactly_when_the_loss_spans_more_than_20(real_run, tmp_path):
    assert "logarithmic when the loss spans more than a factor of 20" in caption("predicted_vs_actual_loss")
    wide = synthetic_run(tmp_path / "wide")  # the loss falls from 0.92 to 0.03
    for run in (real_run, wide):
        ax = draw("predicted_vs_actual_loss", run)
        values = np.concatenate([line.get_ydata() for line in ax.get_lines()])
        spans = values.min() > 0 and values.max() / values.min() > 20
        assert ax.get_yscale() == ("log" if spans else "linear")
    assert draw("predicted_vs_actual_loss", wide).get_yscale() == "log"
    assert draw("predicted_vs_actual_loss", real_run).get_yscale() == "linear"  # both cases are seen


def test_accuracy_caption_solid_dashed_one_colour_per_split_between_0_and_1(real_run):
    assert "network (solid)" in caption("predicted_vs_actual_accuracy")
    ax = draw("predicted_vs_actual_accuracy", real_run)
    lines = lines_by_label(ax)
    assert {label.split(" (")[0] for label in lines} == {"train", "test"}
    for label, line in lines.items():
        assert line.get_linestyle() == ("--" if "predicted" in label else "-")
        assert ((line.get_ydata() >= 0) & (line.get_ydata() <= 1)).all()
        assert marked_points(line)[0].tolist() == real_run.steps.tolist()  # "a marker at each measurement"
    assert_one_colour_per_split(lines)
    assert ax.get_ylim() == pytest.approx((-0.02, 1.02))


def test_gap_caption_relative_to_initial_loss_train_solid_test_dashed(real_run):
    ax = draw("linearisation_gap", real_run)
    lines = lines_by_label(ax)
    assert lines["train"].get_linestyle() == "-" and lines["test"].get_linestyle() == "--"
    metrics = real_run.metrics
    for split, line in lines.items():
        actual, predicted = metrics[f"{split}_loss"], metrics[f"predicted_{split}_loss"]
        np.testing.assert_allclose(line.get_ydata(), np.abs(actual - predicted) / actual[0], rtol=1e-6, atol=1e-12)
    assert ax.get_yscale() == "linear"


# --------------------------------------------------------------------------- the kernel over training


def relative_change(K, K0):
    return np.linalg.norm(K - K0) / np.linalg.norm(K0)


def kernel_distance(K, K0):
    return 1 - np.sum(K * K0) / (np.linalg.norm(K) * np.linalg.norm(K0))


def test_drift_caption_relative_change_solid_distance_dashed_log_y_no_step_zero(real_run):
    ax = draw("drift", real_run)
    [solid] = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    [dashed] = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert solid.get_label().startswith("relative change") and dashed.get_label().startswith("kernel distance")
    assert ax.get_yscale() == "log"
    assert real_run.metrics["relative_change"][0] == 0  # recorded at step 0, and left out:
    kernels = {int(step): real_run.kernel(step).astype(np.float64) for step in real_run.kernel_steps}
    later = [step for step in kernels if step > 0]
    for line, measure in ((solid, relative_change), (dashed, kernel_distance)):
        assert line.get_xdata().tolist() == later
        # "of the probe kernel from its value at step 0": recomputed from the saved kernels
        np.testing.assert_allclose(line.get_ydata(), [measure(kernels[s], kernels[0]) for s in later], rtol=1e-3)


def test_velocity_caption_distance_between_consecutive_measurements_per_step(real_run):
    ax = draw("velocity", real_run)
    [line] = ax.get_lines()
    steps = real_run.kernel_steps.tolist()
    kernels = [real_run.kernel(step).astype(np.float64) for step in steps]
    expected = [kernel_distance(K, previous) / (step - before)
                for before, step, previous, K in zip(steps, steps[1:], kernels, kernels[1:])]
    assert line.get_xdata().tolist() == steps[1:]
    np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-3)
    assert ax.get_yscale() == "log"


def test_eigenvalues_caption_largest_eigenvalues_first_darkest_log_y(real_run):
    ax = draw("eigenvalues", real_run)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines][:2] == ["λ₁", "λ₂"]
    shades = [luminance(line.get_color()) for line in lines]
    assert shades == sorted(shades) and shades[0] < shades[-1]  # λ₁ darkest
    for row, step in enumerate(real_run.steps):
        spectrum = np.linalg.eigvalsh(real_run.kernel(step).astype(np.float64))[::-1]
        assert [line.get_ydata()[row] for line in lines] == pytest.approx(spectrum[: len(lines)], rel=1e-4)
    assert ax.get_yscale() == "log"


def top_edges(band):
    """The upper edge of a stackplot band: its highest vertex at each step."""
    vertices = band.get_paths()[0].vertices
    return {x: vertices[vertices[:, 0] == x, 1].max() for x in np.unique(vertices[:, 0])}


def test_layer_share_caption_bands_stack_to_one(real_run):
    ax = draw("layer_share", real_run)
    groups = [name for name in real_run.metrics if name.startswith("layer_share.")]
    assert len(ax.collections) == len(groups)
    assert all(edge == pytest.approx(1.0) for edge in top_edges(ax.collections[-1]).values())
    assert set(top_edges(ax.collections[-1])) == set(real_run.steps.tolist())


def test_layer_share_caption_beyond_ten_groups_the_smallest_are_one_grey_band(tmp_path):
    assert 'beyond 10 groups the smallest are merged into a grey "other" band' in caption("layer_share")
    path = tmp_path / "twelve"
    shares = {f"g{i}": (i + 1) / 78 for i in range(12)}  # g0, g1, g2 are the smallest
    with RunWriter(path, {}) as writer:
        writer.append({"step": 0, "layer_share": shares})
        writer.append({"step": 1, "layer_share": shares})
    ax = draw("layer_share", load_run(path))
    names = [text.get_text() for text in ax.get_legend().get_texts()]
    assert len(names) == len(ax.collections) == 10
    assert names[:-1] == [f"g{i}" for i in range(3, 12)] and names[-1] == "other (3 groups)"
    red, green, blue = to_rgb(ax.collections[-1].get_facecolor()[0])
    assert red == green == blue  # grey
    assert all(edge == pytest.approx(1.0) for edge in top_edges(ax.collections[-1]).values())


def test_target_alignment_caption_linear_y(real_run):
    ax = draw("target_alignment", real_run)
    [line] = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), real_run.metrics["target_alignment"])
    assert ax.get_yscale() == "linear" and (np.abs(line.get_ydata()) <= 1).all()


# --------------------------------------------------------------------------- heatmaps


def cosine(K):
    return K / np.sqrt(np.outer(np.diagonal(K), np.diagonal(K)))


@pytest.mark.parametrize("kind", ["tracked", "full"])
def test_heatmaps_caption_cosine_on_minus_one_to_one_at_first_and_last_step(kind, real_run, tmp_path):
    text = caption("kernel_heatmaps")
    assert "cosine similarity K_ij / √(K_ii K_jj)" in text and "from −1 to 1" in text
    assert "divided by its mean diagonal" not in text  # what an older caption said, wrongly
    run = real_run if kind == "tracked" else synthetic_run(tmp_path / "full", labels=(1, 0, 1, 0),
                                                           kernel_shape=(4, 4, 2, 2))
    figure = draw("kernel_heatmaps", run)
    assert isinstance(figure, Figure)
    panels = [ax for ax in figure.axes if ax.images]
    saved = run.kernel_steps
    assert [ax.get_title().split()[1] for ax in panels] == [str(saved[0]), str(saved[-1])]

    order = np.argsort(run.meta["probe"]["labels"], kind="stable")  # "sorted by class"
    for ax, step in zip(panels, (saved[0], saved[-1])):
        [image] = ax.images
        K = run.kernel(step).astype(np.float64)
        summed = np.einsum("ijaa->ij", K) if K.ndim == 4 else K  # "summed over outputs"
        np.testing.assert_allclose(image.get_array(), cosine(summed)[np.ix_(order, order)], rtol=1e-6)
        assert image.get_clim() == (-1.0, 1.0)
        assert f"mean diagonal {np.diagonal(summed).mean():.3g}" in ax.get_title()
        ticks = [int(t.get_text()) for t in ax.get_xticklabels()]
        assert ticks == sorted(set(run.meta["probe"]["labels"]))
    assert "sorted by class" in figure._suptitle.get_text()
    # one colour bar, reading every panel (all on the same limits): the cosine's
    [colour_bar] = [ax.images[0].colorbar for ax in panels if ax.images[0].colorbar is not None]
    assert colour_bar.ax.get_ylabel() == COSINE_FORMULA
    assert (colour_bar.norm.vmin, colour_bar.norm.vmax) == (-1.0, 1.0)


def test_heatmap_title_says_why_examples_are_in_probe_order(tmp_path):
    labelled, unlabelled = synthetic_run(tmp_path / "labelled"), synthetic_run(tmp_path / "regression", labels=None)
    unsorted = plots.kernel_heatmaps(labelled, sort_by_class=False)
    np.testing.assert_allclose(unsorted.axes[0].images[0].get_array(), cosine(labelled.kernel(0)))
    assert "in probe order" in unsorted._suptitle.get_text()
    assert "no class labels" not in unsorted._suptitle.get_text()  # the run has them
    assert "no class labels in the run" in plots.kernel_heatmaps(unlabelled)._suptitle.get_text()
