"""``ntk-torch kernel``: a config's kernel on a data split, written to a .npy file."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import ntk_torch as ntk
from ntk_torch import cli, experiment
from ntk_torch.config import parse_config
from ntk_torch.kernel import execution

import test_cli

REPO = Path(__file__).resolve().parents[1]
TINY = {key: value for key, value in copy.deepcopy(test_cli.TINY).items() if key != "sweep"}
TINY["data"]["options"].update(n_test=16, output_dim=2)  # two outputs: full and diagonal kernels differ


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


class _NotWeights:
    pass


def _built():
    return experiment.build(parse_config(TINY))


def _main(*args) -> int:
    return cli.main([str(a) for a in args])


def test_the_kernel_of_the_training_split_at_initialisation(config_file, tmp_path, capsys):
    out = tmp_path / "kernel.npy"
    assert _main("kernel", config_file, "--out", out) == 0
    captured = capsys.readouterr()
    assert "trace kernel (24, 24) on the train split at initialisation" in captured.out
    assert "eNTK tiles" in captured.err and "1/1" in captured.err  # the progress bar: tiles done, ETA
    setup = _built()
    expected = ntk.empirical_ntk(setup.model, setup.split.x_train, mode="trace")
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-6)

    test_out = tmp_path / "test.npy"
    assert _main("kernel", config_file, "--out", test_out, "--split", "test", "--mode", "diagonal",
                 "--no-progress") == 0
    expected = ntk.empirical_ntk(setup.model, setup.split.x_test, mode="diagonal")
    np.testing.assert_allclose(np.load(test_out), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_the_kernel_at_saved_weights(config_file, tmp_path):
    setup = _built()
    with torch.no_grad():
        for p in setup.model.parameters():
            p.mul_(1.5)
    weights = tmp_path / "weights.pt"
    torch.save({"model": setup.model.state_dict(), "step": 12}, weights)
    out = tmp_path / "kernel.npy"
    assert _main("kernel", config_file, "--out", out, "--weights", weights, "--no-progress") == 0
    expected = ntk.empirical_ntk(setup.model, setup.split.x_train, mode="trace")
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-6)
    at_init = ntk.empirical_ntk(_built().model, setup.split.x_train, mode="trace")
    assert not np.allclose(np.load(out), at_init.numpy(), rtol=1e-3)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ntk-torch: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_weights_and_outputs_are_one_line_errors(config_file, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), other)
    assert _main("kernel", config_file, "--out", tmp_path / "a.npy", "--weights", other) == 2
    assert "does not fit the config's model" in _one_line_error(capsys)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": _NotWeights()}, pickled)  # an arbitrary object: weights_only refuses it
    assert _main("kernel", config_file, "--out", tmp_path / "a.npy", "--weights", pickled) == 2
    assert "not a torch.save file of tensors" in _one_line_error(capsys)
    assert _main("kernel", config_file, "--out", tmp_path / "a.npy", "--weights", tmp_path / "missing.pt") == 2
    assert "no such file" in _one_line_error(capsys)
    assert _main("kernel", config_file, "--out", tmp_path / "kernel.txt") == 2
    assert "ending in .npy" in _one_line_error(capsys)
    assert _main("kernel", config_file, "--out", tmp_path / "a.npy", "--mode", "blocks") == 2
    assert "mode" in _one_line_error(capsys)
    assert not (tmp_path / "a.npy").exists()


def test_an_interrupted_kernel_is_resumed(config_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "kernel.npy"
    original = execution.compute_blocks

    def interrupted(engine, x1, x2, pairs):
        for count, item in enumerate(original(engine, x1, x2, pairs)):
            if count == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(execution, "compute_blocks", interrupted)
    args = ("kernel", config_file, "--out", out, "--memory-budget", "20kB", "--no-progress")
    assert _main(*args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and out.with_name("kernel.npy.partial").exists()
    monkeypatch.setattr(execution, "compute_blocks", original)
    assert _main(*args) == 2
    assert "--resume" in _one_line_error(capsys)
    assert _main(*args, "--resume") == 0
    setup = _built()
    expected = ntk.empirical_ntk(setup.model, setup.split.x_train, mode="trace")
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_under_torchrun_two_processes_write_the_same_kernel(config_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "kernel.npy"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "ntk_torch.cli", "kernel", str(config_file), "--out", str(out), "--mode", "full", "--no-progress"]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("written to") == 1 and "over 2 processes" in done.stdout  # rank 0 reports
    setup = _built()
    expected = ntk.empirical_ntk(setup.model, setup.split.x_train, mode="full")
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-7)
