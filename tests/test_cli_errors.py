"""Audit items 1, 3, 5, 6, 7 and 9 through the command line: every error one line with exit
status 2, runs never mixed or written outside --out, outputs never overwritten without
--force, interrupts and failures recorded. Plus a Hypothesis fuzz test over config
documents: no traceback, and no exit status but 0, 2 or 130."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ntk_torch as ntk
from ntk_torch import cli
from test_cli import ntk_torch_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "teacher", "options": {"n_train": 16, "n_test": 8, "input_dim": 3, "output_dim": 1}},
    "model": {"name": "mlp", "options": {"width": 8, "depth": 1, "activation": "tanh"}},
    "train": {"optimizer": "sgd", "lr": 0.1, "steps": 4, "loss": "mse"},
    "track": {"every": 2, "probe_size": 8, "keep_kernels": "all"},
}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def one_line_error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ntk-torch: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_figures(monkeypatch):
    """Training without the figures and report of ``run`` (drawn by other tests)."""
    monkeypatch.setattr(cli, "_finish_run", lambda out, config, args: [])


# --------------------------------------------------------------------------- item 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "{config}", "--set", "track.schedule=[0,-5]"], r"track.schedule\[1\] must be a step"),
        (["run", "{config}", "--set", "track.schedule=[]"], "track.schedule must list at least one step"),
        (["run", "{config}", "--set", "train.lr=.nan"], "train.lr must be a finite number"),
        (["run", "{config}", "--set", "train.lr=.inf"], "train.lr must be a finite number"),
        (["run", "{config}", "--set", "model.options.width=1000000000"], r"would have 5,000,000,001 parameters"),
        (["run", "{config}", "--set", "train.device=meta"], "train.device 'meta' holds no data"),
        (["predict", "{config}", "--set", "train.momentum=1.5"], "train.momentum must be below 1"),
        # Adam was refused here before the linearised twin; a config without a forecast still is
        (["predict", "{config}", "--set", "track.forecast=null"], "track.forecast is null: there is no forecast"),
        (["predict", "{config}", "--set", "train.lr=.nan"], "train.lr must be a finite number"),
        (["run", "{config}", "--set", "data.name=nonexistent_module:make"], "not trusted"),
        (["run", "{config}", "--set", "data.name=nonexistent_module:make", "--allow-import", "nonexistent_module"],
         r"cannot import module 'nonexistent_module'"),
        (["run", "{config}", "--allow-import", "os;rm"], "not a dotted module name"),
        (["run", "{missing}"], "no such config file"),
    ],
)
def test_cli_mistakes_are_one_line_with_exit_status_2(config_file, tmp_path, capsys, argv, message):
    """12 of 32 such mistakes ended in a Python traceback with exit status 1."""
    argv = [a.format(config=config_file, missing=tmp_path / "nope.yaml") for a in argv]
    assert ntk_torch_cli(*argv, "--out", tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_plot_formats_are_checked(tmp_path, capsys):
    from test_run_damage import write_run

    run_dir = write_run(tmp_path / "run")
    assert ntk_torch_cli("plot", run_dir, "--formats", "xyz") == 2
    assert "--formats 'xyz': formats must be a non-empty selection of" in one_line_error(capsys)


def test_an_unexpected_error_is_one_line_with_its_type_and_debug_shows_the_traceback(config_file, tmp_path,
                                                                                     capsys, monkeypatch):
    from ntk_torch import experiment

    def broken(setup, progress=True):
        raise RuntimeError("CUDA out of memory\nwhile allocating")

    monkeypatch.setattr(experiment, "train_loop", broken)
    assert ntk_torch_cli("run", config_file, "--out", tmp_path / "a", "--no-progress") == 2
    assert one_line_error(capsys) == ("ntk-torch: error: RuntimeError: CUDA out of memory while allocating "
                                      "(run with --debug for the traceback)")
    run = ntk.load_run(tmp_path / "a")  # the failed run says so, and why
    assert run.status == "failed" and run.reason == "RuntimeError: CUDA out of memory while allocating"
    assert len(run) == 1  # step 0 was recorded
    assert ntk_torch_cli("run", config_file, "--out", tmp_path / "b", "--no-progress", "--debug") == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ntk-torch: error: RuntimeError: CUDA" in err
    assert ntk_torch_cli("--debug", "run", config_file, "--out", tmp_path / "c", "--no-progress") == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_run_that_failed_before_recording_is_replaced_without_force(config_file, tmp_path, capsys,
                                                                      monkeypatch, no_figures):
    """A failed run left a half-made directory with no status that needed --force."""
    from ntk_torch import tracker

    real = tracker.NTKTracker._measurement
    monkeypatch.setattr(tracker.NTKTracker, "_measurement", lambda self: (_ for _ in ()).throw(ValueError("boom")))
    out = tmp_path / "run"
    assert ntk_torch_cli("run", config_file, "--out", out, "--no-progress") == 2
    assert ntk.load_run(out).status == "failed" and ntk.load_run(out).reason == "ValueError: boom"
    capsys.readouterr()
    monkeypatch.setattr(tracker.NTKTracker, "_measurement", real)
    assert ntk_torch_cli("run", config_file, "--out", out, "--no-progress") == 0
    assert "replacing" in capsys.readouterr().err and "ValueError: boom" not in json.dumps(ntk.load_run(out).meta)
    assert ntk.load_run(out).status == "completed"
    assert ntk_torch_cli("run", config_file, "--out", out, "--no-progress") == 2  # a real run: --force needed
    assert "already exists; pass --force" in one_line_error(capsys)


def test_warnings_are_printed_as_one_line(config_file, tmp_path, capsys, no_figures):
    """Item 9: probe_size larger than the data was cut silently; the saved config kept it."""
    assert ntk_torch_cli("run", config_file, "--out", tmp_path / "run", "--no-progress",
                         "--set", "track.probe_size=500") == 0
    err = capsys.readouterr().err
    assert ("ntk-torch: warning: track.probe_size=500 is more than the 16 training examples; "
            "the probe is all 16 of them") in err.splitlines()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["track"]["probe_size"] == 16
    assert ntk.load_run(tmp_path / "run").meta["probe"]["size"] == 16


# --------------------------------------------------------------------------- items 1, 3


def test_a_config_name_cannot_reach_another_run(config_file, tmp_path, capsys, monkeypatch, no_figures):
    """name: ../../../victim with sweep --out sw2/inner rewrote an unrelated run."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim"
    assert ntk_torch_cli("run", config_file, "--out", victim, "--no-progress") == 0
    before = {p.name: p.read_bytes() for p in victim.iterdir() if p.is_file()}
    swept = {**TINY, "name": "../../../victim", "sweep": {"parameter": "model.options.width", "values": [8]}}
    config_file.write_text(yaml.safe_dump(swept))
    assert ntk_torch_cli("sweep", config_file, "--out", "sw2/inner", "--no-progress") == 2
    assert "name must be a plain name" in one_line_error(capsys)
    config_file.write_text(yaml.safe_dump({**swept, "name": str(victim)}))
    assert ntk_torch_cli("sweep", config_file, "--out", "sw2/inner", "--no-progress") == 2
    assert "name must be a plain name" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in victim.iterdir() if p.is_file()} == before


def test_sweep_values_that_would_leave_the_output_or_collide_are_refused(config_file, capsys):
    swept = {**TINY, "sweep": {"parameter": "data.name", "values": ["../x"]}}
    config_file.write_text(yaml.safe_dump(swept))
    assert ntk_torch_cli("sweep", config_file) == 2
    assert "the run name must be a plain name" in one_line_error(capsys)
    swept["sweep"] = {"parameter": "train.lr", "values": [0.1, 0.1]}
    config_file.write_text(yaml.safe_dump(swept))
    assert ntk_torch_cli("sweep", config_file) == 2
    assert "give two runs the same name 'tiny-lr0.1'" in one_line_error(capsys)


def test_a_config_cannot_run_code_from_an_untrusted_module(config_file, tmp_path, capsys, monkeypatch):
    """model: {name: "os:system", options: {command: ...}} ran the shell command."""
    calls = []
    monkeypatch.setattr(os, "system", lambda command: calls.append(command) or 0)
    monkeypatch.delenv("NTK_TORCH_ALLOW_IMPORT", raising=False)
    marker = tmp_path / "PWNED"
    for command in ("run", "predict"):
        assert ntk_torch_cli(command, config_file, "--out", tmp_path / command, "--set", "model.name=os:system",
                             "--set", f"model.options={{command: 'touch {marker}'}}") == 2
        assert "model.name 'os:system' would import and run code from module 'os', which is not trusted" in (
            one_line_error(capsys))
    assert calls == [] and not marker.exists()


def test_trusted_import_paths_are_printed_and_used(config_file, tmp_path, capsys, monkeypatch, no_figures):
    package = tmp_path / "mydata"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        import torch
        def make(n=12):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, 3, generator=g)
            return x, x[:, :1], x[:4], x[:4, :1]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = ["--set", "data.name=mydata:make", "--set", "data.options={}"]
    assert ntk_torch_cli("run", config_file, "--out", tmp_path / "a", "--no-progress", *data) == 2
    assert "--allow-import mydata" in one_line_error(capsys)
    assert ntk_torch_cli("run", config_file, "--out", tmp_path / "a", "--no-progress", *data,
                         "--allow-import", "mydata") == 0
    assert "data.name 'mydata:make': the config runs code from this trusted module" in capsys.readouterr().err
    monkeypatch.setenv("NTK_TORCH_ALLOW_IMPORT", "other,mydata")
    assert ntk_torch_cli("run", config_file, "--out", tmp_path / "b", "--no-progress", *data) == 0
    assert len(ntk.load_run(tmp_path / "b")) == 3


# --------------------------------------------------------------------------- items 6, 9


def _damaged_run(tmp_path):
    from test_run_damage import kernel_file, write_run

    run_dir = write_run(tmp_path / "damaged")
    kernel_file(run_dir, 0).write_bytes(b"\x93NUMPY truncated")
    np.save(kernel_file(run_dir, 4), np.ones(7))
    with open(run_dir / "metrics.jsonl", "ab") as file:
        file.write(b"[" * 100_000 + b"\n")
    return run_dir


@pytest.mark.slow
def test_plot_report_and_compare_draw_what_is_readable_and_name_the_rest(tmp_path, capsys):
    """A damaged first or last kernel file, or a corrupt meta.json, made them die."""
    run_dir = _damaged_run(tmp_path)
    assert ntk_torch_cli("plot", run_dir, "--formats", "png") == 0
    err = capsys.readouterr().err
    assert "kernels/step_00000000.npy skipped" in err and "nested deeper than 64 levels" in err
    assert "heatmaps skip the saved kernels of step 4" in err and "Traceback" not in err
    assert (run_dir / "figures" / "kernel_heatmaps.png").is_file() and (run_dir / "figures" / "drift.png").is_file()
    assert ntk_torch_cli("report", run_dir) == 0
    page = (run_dir / "report.html").read_text()
    assert "read with problems" in page and "step_00000000.npy skipped" in page
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    for command in ("plot", "report"):
        assert ntk_torch_cli(command, broken) == 2
        assert "broken/meta.json is unreadable: not valid JSON" in one_line_error(capsys)
    assert ntk_torch_cli("compare", run_dir, broken, "--out", tmp_path / "cmp") == 0
    assert "compare skips" in capsys.readouterr().err and (tmp_path / "cmp" / "compare.png").is_file()
    assert ntk_torch_cli("compare", broken, "--out", tmp_path / "cmp2") == 2
    assert "none of the runs given to compare could be read" in one_line_error(capsys)


@pytest.mark.slow
def test_predict_and_compare_never_overwrite_without_force(config_file, tmp_path, capsys, monkeypatch):
    """They overwrote their output silently, and compare wrote ./compare."""
    from test_run_damage import write_run

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pred"
    assert ntk_torch_cli("predict", config_file, "--out", out) == 0
    figure = (out / "predicted.png").read_bytes()
    assert ntk_torch_cli("predict", config_file, "--out", out, "--set", "train.lr=0.05") == 2
    assert "already exists; pass --force" in one_line_error(capsys)
    assert (out / "predicted.png").read_bytes() == figure
    assert ntk_torch_cli("predict", config_file, "--out", out, "--set", "train.lr=0.05", "--force") == 0
    run_dir = write_run(tmp_path / "run")
    assert ntk_torch_cli("compare", run_dir) == 0
    assert (tmp_path / "runs" / "compare" / "compare.png").is_file() and not (tmp_path / "compare").exists()
    assert ntk_torch_cli("compare", run_dir) == 2
    assert "already exists; pass --force" in one_line_error(capsys)
    assert ntk_torch_cli("compare", run_dir, "--force") == 0


# --------------------------------------------------------------------------- item 7


def test_the_command_module_imports_no_torch():
    """So that Ctrl-C while torch loads happens inside main (next test)."""
    code = "import sys, ntk_torch.cli; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0


def test_ctrl_c_while_importing_prints_no_traceback(config_file):
    """SIGINT during imports printed a traceback: Ctrl-C as torch is imported, exactly."""
    code = textwrap.dedent("""
        import builtins, sys
        real = builtins.__import__
        def interrupted(name, *args, **kwargs):
            if name == "torch":
                raise KeyboardInterrupt
            return real(name, *args, **kwargs)
        builtins.__import__ = interrupted
        from ntk_torch.cli import main
        sys.exit(main(["run", sys.argv[1], "--out", sys.argv[2]]))
    """)
    result = subprocess.run([sys.executable, "-c", code, str(config_file), str(config_file.parent / "out")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "ntk-torch: interrupted"


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_stops_a_run_like_ctrl_c(config_file, tmp_path):
    """SIGTERM left status unset; now status interrupted and exit status 143."""
    long = {**TINY, "train": {**TINY["train"], "steps": 10**7}, "track": {**TINY["track"], "every": 1000}}
    config_file.write_text(yaml.safe_dump(long))
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "ntk_torch.cli", "run", str(config_file), "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_bytes():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143 and "Traceback" not in err, err
    assert "ntk-torch: terminated (SIGTERM); the run recorded so far is in" in err
    run = ntk.load_run(out)
    assert run.status == "interrupted" and run.reason == "SIGTERM"


# --------------------------------------------------------------------------- fuzz

_KEYS = ["name", "seed", "data.name", "data.options", "data.options.n_train", "data.options.input_dim",
         "model.name", "model.options", "model.options.width", "model.options.depth", "model.options.activation",
         "train.optimizer", "train.lr", "train.momentum", "train.nesterov", "train.weight_decay",
         "train.batch_size", "train.steps", "train.loss", "train.device", "train.dtype", "track.every",
         "track.schedule", "track.probe_size", "track.mode", "track.method", "track.keep_kernels", "train",
         "track", "sweep", "bogus", "train.bogus"]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 30),
    st.sampled_from([2**53, 10**30, -(10**30), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "../x", "/abs", "os:system", "builtins:print", "meta", "cuda", "cpu", "log", "digits",
                     "sine", "cnn", "mlp", "adam", "full", "diagonal", "cross_entropy", "float64", "x" * 300]),
    st.text(max_size=6),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["width", "depth", "n_train", "lr", "a", "seed"]), inner, max_size=3), max_leaves=6)


def _set(tree, dotted, value):
    *parents, last = dotted.split(".")
    for part in parents:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[last] = value


def _document(mutations, text_damage):
    config = json.loads(json.dumps(TINY))
    for key, value in mutations:
        _set(config, key, value)
    text = yaml.safe_dump(config, sort_keys=False)
    kind, position, payload = text_damage
    position = min(position, len(text))
    if kind == "cut":
        text = text[:position]
    elif kind == "insert":
        text = text[:position] + payload + text[position:]
    elif kind == "duplicate line":
        lines = text.splitlines(keepends=True)
        index = min(position, len(lines) - 1)
        text = "".join(lines[: index + 1] + lines[index:])
    return text


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mutations=st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), max_size=3),
    text_damage=st.tuples(st.sampled_from(["none", "cut", "insert", "duplicate line"]), st.integers(0, 400),
                          st.text(alphabet=":{}[]-#&*!|>'\"\n ab1", max_size=6)),
)
def test_fuzz_config_documents_never_give_a_traceback(monkeypatch, capsys, mutations, text_damage):
    """Valid documents train (a few tiny steps; figures are left to the damaged-run tests),
    invalid ones are one line with exit status 2."""
    monkeypatch.setattr(cli, "_finish_run", lambda out, config, args: [])
    monkeypatch.delenv("NTK_TORCH_ALLOW_IMPORT", raising=False)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "fuzz.yaml"
        path.write_text(_document(mutations, text_damage))
        status = cli.main(["run", str(path), "--out", str(Path(scratch) / "out"), "--no-progress"])
    if status in (130, 143):  # no document interrupts: this was Ctrl-C (or SIGTERM) for the test run itself
        raise KeyboardInterrupt
    captured = capsys.readouterr()
    assert status in (0, 2), captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("ntk-torch: error: ")]
    assert len(errors) == (status == 2), captured.err
