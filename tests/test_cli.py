"""The ``ntk-torch`` command end to end, on small configs."""

import base64
import html.parser
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import ntk_torch as ntk
from ntk_torch import cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "teacher", "options": {"n_train": 24, "n_test": 24, "input_dim": 4, "output_dim": 1}},
    "model": {"name": "mlp", "options": {"width": 32, "depth": 1, "parametrization": "ntk", "activation": "tanh"}},
    "train": {"optimizer": "sgd", "lr": 0.5, "batch_size": None, "steps": 12, "loss": "mse"},
    "track": {"every": 4, "probe_size": 12, "mode": "trace", "keep_kernels": "all"},
    "sweep": {"parameter": "model.options.width", "values": [16, 64, 256]},
}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def ntk_torch_cli(*args):
    return cli.main([str(a) for a in args])


def final(run, column):
    return run.last_finite(column)[0]


class _Parser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = 0

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"


@pytest.mark.slow
def test_run_plot_report_compare_end_to_end(tiny_config, tmp_path, capsys):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert ntk_torch_cli("run", tiny_config, "--out", out_a, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "final train loss (predicted)" in printed and "relative change" in printed
    run = ntk.load_run(out_a)
    assert list(run.steps) == [0, 4, 8, 12] and run.status == "completed"
    assert yaml.safe_load((out_a / "config.yaml").read_text())["name"] == "tiny"
    for png in (out_a / "figures").glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC)
    assert (out_a / "figures" / "predicted_vs_actual_loss.png").exists()
    page = (out_a / "report.html").read_text()
    parser = _Parser()
    parser.feed(page)
    assert parser.images >= 5 and "<script" not in page
    embedded = re.findall(r'<figure id="fig-([^"]+)"><img src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == parser.images  # each the very PNG of figures/, drawn once
    for name, data in embedded:
        assert base64.b64decode(data) == (out_a / "figures" / f"{name}.png").read_bytes(), name

    assert ntk_torch_cli("run", tiny_config, "--out", out_b, "--no-progress", "--set", "train.lr=0.1") == 0
    assert ntk.load_run(out_b).meta["prediction"]["lr"] == 0.1  # --set reached the optimizer
    shutil.rmtree(out_a / "figures")
    assert ntk_torch_cli("plot", out_a, "--formats", "png") == 0
    assert (out_a / "figures" / "drift.png").read_bytes().startswith(PNG_MAGIC)
    (out_a / "report.html").unlink()
    assert ntk_torch_cli("report", out_a) == 0
    assert (out_a / "report.html").exists()
    assert ntk_torch_cli("compare", out_a, out_b, "--out", tmp_path / "cmp", "--labels", "lr 0.5", "lr 0.1") == 0
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_existing_output_is_never_overwritten_silently(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert ntk_torch_cli("run", tiny_config, "--out", out, "--no-progress") == 0
    before = (out / "metrics.jsonl").read_bytes()
    assert ntk_torch_cli("run", tiny_config, "--out", out, "--no-progress") == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before
    assert ntk_torch_cli("run", tiny_config, "--out", out, "--no-progress", "--force", "--set", "train.steps=4") == 0
    assert list(ntk.load_run(out).steps) == [0, 4]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep")
    assert ntk_torch_cli("run", tiny_config, "--out", tmp_path / "other", "--force", "--no-progress") == 2
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep"  # not a run: never deleted


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.lrr=1"], r"unknown key 'train.lrr'"),
        (["--set", "train.lr=fast"], r"train.lr must be a number"),
        (["--set", "model.options.width=0"], r"model \(mlp\): width must be"),
        (["--set", "data.options.colour=red"], r"data \(teacher\):.*colour"),
        (["--set", "train.loss=cross_entropy"], r"regression task; use 'mse'"),
    ],
)
def test_config_errors_exit_2_without_traceback(tiny_config, tmp_path, capsys, args, message):
    assert ntk_torch_cli("run", tiny_config, "--out", tmp_path / "x", *args) == 2
    err = capsys.readouterr().err
    *phases, last = err.splitlines()
    assert last.startswith("ntk-torch: error: ") and "Traceback" not in err
    assert all(re.fullmatch(r"ntk-torch: .* \.\.\. [\d.]+ s", line) for line in phases), err  # the phases done
    assert re.search(message, last), err


def test_usage_errors_exit_2(capsys):
    for argv in (["run"], ["frobnicate"], ["run", "a.yaml", "--bogus"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert ntk_torch_cli("plot", "/nonexistent/run") == 2
    assert "not an ntk_torch run directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "sweep", "select", "predict", "plot", "report", "compare", "bench"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert "usage: ntk-torch " + command in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_draws_the_lazy_regime_picture(tiny_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert ntk_torch_cli("sweep", tiny_config, "--out", out, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert re.search(r"relative change ~ model.options.width\^-\d", printed)
    assert (out / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["tiny-width16", "tiny-width256", "tiny-width64"]
    gaps = [final(ntk.load_run(out / f"tiny-width{w}"), "linearisation_gap") for w in (16, 64, 256)]
    assert gaps[0] > gaps[-1]


def test_sweep_predict_only_ranks_without_training(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ntk_torch_cli("sweep", tiny_config, "--predict-only") == 0
    printed = capsys.readouterr().out
    assert "Ranking by predicted test loss" in printed
    assert len(re.findall(r"^\s+\d\. model.options.width=", printed, re.M)) == 3
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
    assert ntk_torch_cli("sweep", tiny_config, "--predict-only", "--set", "sweep.seeds=2") == 0
    assert "mean of 2 seeds" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_with_several_seeds_runs_each_value_per_seed(tiny_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    overrides = ["--set", "sweep.seeds=2", "--set", "sweep.values=[16, 64]", "--set", "train.steps=4",
                 "--set", "model.options.activation=relu", "--set", "track.analytic_reference=true"]
    assert ntk_torch_cli("sweep", tiny_config, "--out", out, "--no-progress", *overrides) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["tiny-width16-seed0", "tiny-width16-seed1", "tiny-width64-seed0", "tiny-width64-seed1"]
    assert ntk.load_run(out / "tiny-width16-seed1").meta["config"]["seed"] == 1
    printed = capsys.readouterr().out
    changes = [final(ntk.load_run(out / f"tiny-width16-seed{s}"), "relative_change") for s in (0, 1)]
    spread = f"{np.mean(changes):.4g} ± {np.std(changes, ddof=1):.4g}"
    assert f"relative change {spread} (min {min(changes):.4g}, max {max(changes):.4g}, 2 seeds)" in printed
    assert "mean ± standard deviation over 2 seeds" in printed
    row = next(line for line in printed.splitlines() if line.split()[:1] == ["16"])  # the table's spread too
    assert spread in row
    assert "caveat: fitted through only 2 points" in printed  # no bare slope from 2 values
    # the distance of the kernel at initialisation from the infinite-width NTK: a column, a curve, smaller when wider
    distance = {w: np.mean([ntk.load_run(out / f"tiny-width{w}-seed{s}").first_finite("analytic_distance")[0]
                            for s in (0, 1)]) for w in (16, 64)}
    assert "distance from infinite width (step 0)" in printed and f"{distance[16]:.4g} ±" in row
    assert distance[64] < distance[16]
    assert "distance from infinite width (step 0) ~ model.options.width^-" in printed


@pytest.mark.slow
def test_predict_agrees_with_the_trained_wide_teacher_run(tmp_path, capsys):
    """teacher_ntk_param: predicted and actual train loss within 10%, and `predict`
    (before training) agrees with the trained run's curve within the same 10%."""
    config = CONFIGS / "teacher_ntk_param.yaml"
    smaller = ["--set", "train.steps=60", "--set", "track.every=20", "--set", "model.options.width=1024"]
    assert ntk_torch_cli("predict", config, "--out", tmp_path / "pred", *smaller) == 0
    printed = capsys.readouterr().out
    predicted = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^\s+(\d+)\s+([\d.e-]+)", printed, re.M)}
    assert (tmp_path / "pred" / "predicted.png").exists()
    assert ntk_torch_cli("run", config, "--out", tmp_path / "run", "--no-progress", *smaller) == 0
    run = ntk.load_run(tmp_path / "run")
    actual = final(run, "train_loss")
    assert final(run, "predicted_train_loss") == pytest.approx(actual, rel=0.1)
    assert predicted[60] == pytest.approx(actual, rel=0.1)
    assert actual < 0.2 * run.metrics["train_loss"][0]


@pytest.mark.slow
def test_digits_mlp_drifts_more_at_small_width(tmp_path):
    config = CONFIGS / "digits_mlp.yaml"
    short = ["--no-progress", "--set", "train.steps=60", "--set", "track.every=30", "--set", "track.probe_size=64"]
    drift = {}
    for width in (32, 512):
        out = tmp_path / f"w{width}"
        assert ntk_torch_cli("run", config, "--out", out, "--set", f"model.options.width={width}", *short) == 0
        drift[width] = final(ntk.load_run(out), "relative_change")
    assert drift[512] > 0
    assert drift[32] > drift[512]


@pytest.mark.slow
def test_predict_and_run_use_the_same_twin_for_adam_a_scheduler_and_clipping(tmp_path, capsys):
    """``predict`` trains the twin alone; ``run`` trains the network with the twin beside it,
    on the same minibatches, at the same learning rates: the curves agree."""
    from ntk_torch import experiment
    from ntk_torch.config import load_config

    train = {"optimizer": "adam", "lr": 0.02, "batch_size": 8, "steps": 12, "loss": "mse",
             "scheduler": {"name": "step", "step_size": 5, "gamma": 0.5}, "clip_grad_norm": 0.05}
    path = tmp_path / "adam.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": "adam", "train": train}))
    assert ntk_torch_cli("predict", path, "--out", tmp_path / "pred") == 0
    printed = capsys.readouterr().out
    assert "the linearised twin, trained alone with Adam on minibatches (no real training)" in printed
    assert (tmp_path / "pred" / "predicted.png").exists()
    config = load_config(path)
    before = experiment.forecast(config, steps=[0, 4, 8, 12])
    assert before.max_learning_rate is None and before.description["kind"] == "twin"

    run = experiment.run(config, tmp_path / "run", progress=False)  # what `ntk-torch run` trains
    assert run.meta["forecast"] == {"kind": "twin", "batches": "minibatch"}
    assert run.meta["prediction"]["clip_grad_norm"] == 0.05
    assert list(run.steps) == [0, 4, 8, 12]
    for step, row, record in zip(before.steps, before.rows, run.records):
        assert record["step"] == step
        assert record["predicted_train_loss"] == pytest.approx(row["predicted_train_loss"], rel=1e-6)
        assert record["predicted_test_loss"] == pytest.approx(row["predicted_test_loss"], rel=1e-6)
    assert run.records[-1]["predicted_train_loss"] < run.records[0]["predicted_train_loss"]


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop", "adagrad"])
def test_every_configured_optimizer_runs_with_the_twin(tmp_path, optimizer):
    from ntk_torch import experiment
    from ntk_torch.config import parse_config

    config = parse_config({**TINY, "train": {**TINY["train"], "optimizer": optimizer, "lr": 0.01, "steps": 4,
                                             "scheduler": {"name": "one-cycle"}}})
    setup = experiment.build(config)
    assert type(setup.optimizer).__name__.lower() == optimizer
    assert isinstance(setup.scheduler, torch.optim.lr_scheduler.OneCycleLR)
    run = experiment.run(config, tmp_path / optimizer, progress=False)
    assert run.meta["forecast"] == {"kind": "twin", "batches": "full"}
    assert run.meta["prediction"]["optimizer"].lower() == optimizer


def test_configured_spectrum_reaches_the_tracker():
    from ntk_torch import experiment
    from ntk_torch.config import parse_config

    config = parse_config({**TINY, "track": {**TINY.get("track", {}), "spectrum": "top"}})
    tracker = experiment.make_tracker(experiment.build(config), None)
    assert tracker._kernel.drift.spectrum.choice == "top"
    assert parse_config(TINY).track.spectrum == "auto"


@pytest.mark.parametrize("name", ["digits_mlp", "digits_adam", "digits_cnn", "teacher_ntk_param", "width_sweep"])
def test_shipped_configs_are_valid(name):
    from ntk_torch.config import load_config

    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.name == name


def test_ctrl_c_during_a_run_leaves_a_loadable_run(tiny_config, tmp_path, monkeypatch, capsys):
    from ntk_torch import experiment

    def interrupted_loop(setup, progress=True):
        setup.optimizer.step()  # one real step, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "train_loop", interrupted_loop)
    assert ntk_torch_cli("run", tiny_config, "--out", tmp_path / "run", "--no-progress") == 130
    assert "interrupted" in capsys.readouterr().err
    run = ntk.load_run(tmp_path / "run")
    assert run.status == "interrupted" and list(run.steps) == [0]


def test_every_command_reads_the_keep_freed_memory_switch(monkeypatch, tmp_path, capsys):
    from ntk_torch import allocator

    asked = []
    monkeypatch.setattr(allocator, "keep_for_command", lambda: asked.append(True))
    assert ntk_torch_cli("report", tmp_path / "missing") == 2  # asked before the command fails
    assert asked == [True]


def test_a_bad_keep_freed_memory_switch_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from ntk_torch import allocator

    monkeypatch.setenv(allocator.KEEP_FREED_MEMORY, "yes")
    assert ntk_torch_cli("report", tmp_path / "missing") == 2
    err = capsys.readouterr().err.strip()
    assert err == "ntk-torch: error: NTK_TORCH_KEEP_FREED_MEMORY must be 0 or 1, got 'yes'"


@pytest.mark.slow  # two fresh interpreters, each loading torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's and Linux's settings")
def test_the_command_sets_its_memory_up_in_its_own_process(tmp_path):
    """Huge pages by default, set before torch loads (importing the command's module does
    not load torch); freed memory kept only when asked for."""
    import os
    import subprocess

    from ntk_torch import allocator

    code = ("import sys; from ntk_torch import allocator, cli; "
            f"cli.main(['report', {str(tmp_path / 'missing')!r}]); import torch; print(allocator.describe())")
    env = {k: v for k, v in os.environ.items() if k not in (allocator.KEEP_FREED_MEMORY, allocator.HUGE_PAGES)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "glibc returns freed memory to the system; THP_MEM_ALLOC_ENABLE=1"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, allocator.KEEP_FREED_MEMORY: "1", allocator.HUGE_PAGES: "0"})
    assert done.stdout.strip() == "glibc keeps freed memory (ntk_torch.keep_freed_memory); THP_MEM_ALLOC_ENABLE=0"
