"""Audit items 1, 2 and 10: run paths resolved before any check, the never-overwrite guard
race-free and type-checked, one permission policy for every run file."""

import os
import stat
import threading

import numpy as np
import pytest
import torch
from torch import nn

from ntk_torch import NTKTracker, load_run
from ntk_torch.runs import RunWriter


def _run(path, steps=(0, 1, 2), meta=None):
    with RunWriter(path, meta or {"who": "first"}) as writer:
        for step in steps:
            writer.append({"step": step})
    return path


def test_dotdot_path_cannot_slip_past_the_guard_into_an_existing_run(tmp_path, monkeypatch):
    """Item 1: 'nonexistent/../existing' is 'existing' to the guard, not a new directory."""
    monkeypatch.chdir(tmp_path)
    _run(tmp_path / "existing")
    with pytest.raises(FileExistsError, match="already holds an ntk_torch run"):
        RunWriter("nonexistent/../existing", {"who": "second"})
    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randn(8, 2))
    with pytest.raises(FileExistsError, match="already holds an ntk_torch run"):
        NTKTracker(model, data, loss="mse", probe_size=4, progress=False, run_dir="nonexistent/../existing")
    run = load_run("existing")
    assert run.steps.tolist() == [0, 1, 2] and run.meta == {"who": "first"} and not run.problems
    assert not (tmp_path / "nonexistent").exists()


def test_writer_path_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    writer = RunWriter("a/../b", {})
    assert writer.path == (tmp_path / "b").resolve()
    writer.close()
    assert load_run(tmp_path / "b").path == writer.path


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, [True]])
def test_overwrite_must_be_a_bool(tmp_path, value):
    """Item 2: overwrite="no" was truthy and deleted the run; now a TypeError, run intact."""
    _run(tmp_path / "run")
    with pytest.raises(TypeError, match=r"overwrite must be a bool \(True or False\), got "):
        RunWriter(tmp_path / "run", {"who": "second"}, overwrite=value)
    with pytest.raises(TypeError, match=r"overwrite must be a bool \(True or False\), got "):
        NTKTracker(nn.Linear(3, 2), (torch.randn(8, 3), torch.randn(8, 2)), loss="mse", probe_size=4,
                   progress=False, run_dir=tmp_path / "run", overwrite=value)
    assert load_run(tmp_path / "run").meta == {"who": "first"}


def test_concurrent_writers_on_one_directory_never_mix(tmp_path):
    """Of writers started on one fresh directory at once, one wins; the others fail."""
    for attempt in range(5):
        path = tmp_path / f"run{attempt}"
        barrier = threading.Barrier(8)
        outcomes = []

        def start(index):
            barrier.wait()
            try:
                writer = RunWriter(path, {"who": index})
            except FileExistsError:
                outcomes.append(("refused", index))
                return
            writer.append({"step": index})
            writer.close("completed")
            outcomes.append(("won", index))

        threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [index for outcome, index in outcomes if outcome == "won"]
        assert len(winners) == 1, outcomes
        run = load_run(path)
        assert run.meta == {"who": winners[0]} and run.steps.tolist() == [winners[0]]


def test_a_directory_claimed_meanwhile_is_refused(tmp_path, monkeypatch):
    """The claim itself is exclusive: a meta.json that appears after the checks wins."""
    from ntk_torch.runs import writer as writer_module

    path = tmp_path / "run"
    real = writer_module.claim_file

    def someone_else_first(target, content):
        _run_meta = b'{"format": "ntk_torch.run", "version": 1, "meta": {"who": "other"}}'
        target.write_bytes(_run_meta)
        real(target, content)

    monkeypatch.setattr(writer_module, "claim_file", someone_else_first)
    with pytest.raises(FileExistsError, match="claimed by another writer"):
        RunWriter(path, {"who": "late"})
    assert b'"other"' in (path / "meta.json").read_bytes()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_every_run_file_follows_the_umask(tmp_path, umask):
    """Item 10: meta.json and kernels were 0600 (mkstemp) beside 0644 records."""
    previous = os.umask(umask)
    try:
        with RunWriter(tmp_path / "run", {"a": 1}, keep_kernels="all") as writer:
            writer.append({"step": 0})
            writer.save_kernel(0, np.eye(2))
            writer.update_meta(b=2)
        writer.close("completed")
    finally:
        os.umask(previous)
    run_dir = tmp_path / "run"
    files = [run_dir / "meta.json", run_dir / "metrics.jsonl", run_dir / "kernels" / "step_00000000.npy"]
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
    for directory in (run_dir, run_dir / "kernels"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask, directory
    assert not [p for p in run_dir.rglob(".*.tmp")]  # no temporary file left behind
