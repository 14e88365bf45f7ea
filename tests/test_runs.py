"""Tests for ntk_torch.runs: round trip, kernel policies, crash recovery and errors."""

import json
import math
import os

import numpy as np
import pytest
import torch

from ntk_torch.runs import KEEP_KERNELS, RunWriter, load_run

META = {"model": "mlp", "width": 64, "lr": 0.1, "probe": {"n": 8}}


def _write(path, records, *, keep_kernels="all", kernels=()):
    with RunWriter(path, META, keep_kernels=keep_kernels) as writer:
        for record in records:
            writer.append(record)
        for step, K in kernels:
            writer.save_kernel(step, K)
    return path


def _kernel_files(path):
    return sorted(p.name for p in (path / "kernels").iterdir())


# --------------------------------------------------------------------------- round trip


def test_round_trip_records_meta_and_kernels(tmp_path):
    records = [
        {"step": 0, "time": 0.5, "loss": 2.3, "note": "init",
         "layer_share": {"0.weight": 0.75, "0.bias": 0.25}, "spectrum": [3.0, 2.0, 1.0]},
        {"step": 10, "time": 1.5, "loss": float("nan"), "distance": float("inf"),
         "layer_share": {"0.weight": 0.5}, "spectrum": [4.0]},
        {"step": 20, "time": 2.5, "loss": None, "distance": -float("inf"), "spectrum": None},
    ]
    K0 = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    K20 = np.arange(9, dtype=np.float32).reshape(3, 3)
    path = _write(tmp_path / "run", records, kernels=[(0, K0), (20, K20)])

    run = load_run(path)
    assert run.path == path
    assert run.meta == META
    assert run.keep_kernels == "all"
    assert len(run) == 3
    assert run.steps.dtype == np.int64 and run.steps.tolist() == [0, 10, 20]
    assert run.records[0] == records[0]
    assert math.isnan(run.records[1]["loss"]) and run.records[1]["distance"] == math.inf
    assert run.records[2]["loss"] is None and run.records[2]["distance"] == -math.inf

    m = run.metrics
    assert "step" not in m
    np.testing.assert_array_equal(m["time"], [0.5, 1.5, 2.5])
    np.testing.assert_array_equal(m["loss"], [2.3, np.nan, np.nan])
    np.testing.assert_array_equal(m["distance"], [np.nan, np.inf, -np.inf])
    np.testing.assert_array_equal(m["layer_share.0.weight"], [0.75, 0.5, np.nan])
    np.testing.assert_array_equal(m["layer_share.0.bias"], [0.25, np.nan, np.nan])
    np.testing.assert_array_equal(m["spectrum"], [[3, 2, 1], [4, np.nan, np.nan], [np.nan] * 3])
    assert m["loss"].dtype == np.float64 and m["spectrum"].shape == (3, 3)
    assert m["note"].dtype == object and m["note"].tolist() == ["init", None, None]

    assert run.kernel_steps.tolist() == [0, 20]
    np.testing.assert_array_equal(run.kernel(0), K0.numpy())
    assert run.kernel(20).dtype == np.float32
    np.testing.assert_array_equal(run.kernel(20), K20)


def test_numpy_and_tensor_values_are_converted(tmp_path):
    record = {"step": np.int64(3), "a": np.float32(0.5), "b": torch.tensor(2.0),
              "c": torch.tensor([1.0, 2.0]), "d": np.array([3, 4])}
    run = load_run(_write(tmp_path / "run", [record]))
    assert run.records == [{"step": 3, "a": 0.5, "b": 2.0, "c": [1.0, 2.0], "d": [3, 4]}]


def test_each_record_is_one_json_line_on_disk_before_close(tmp_path):
    writer = RunWriter(tmp_path / "run", META)
    writer.append({"step": 0, "x": float("nan")})
    writer.append({"step": 1, "x": 1.0})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    assert "NaN" in lines[0]
    assert load_run(tmp_path / "run").steps.tolist() == [0, 1]  # readable while open
    writer.close()
    writer.close()  # idempotent
    assert writer.closed
    with pytest.raises(ValueError, match="closed"):
        writer.append({"step": 2})


def test_empty_run_loads(tmp_path):
    RunWriter(tmp_path / "run", {}).close()
    run = load_run(tmp_path / "run")
    assert run.meta == {} and run.records == [] and run.metrics == {}
    assert run.steps.shape == (0,) and run.kernel_steps.shape == (0,)


# --------------------------------------------------------------------------- kernel policies


def _save_at(path, keep_kernels, steps):
    K = np.eye(2)
    with RunWriter(path, META, keep_kernels=keep_kernels) as writer:
        kept = [writer.save_kernel(step, K * step) is not None for step in steps]
    return kept


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("all", list(range(0, 100, 10))),
        # Measurement indices 0, 1, 2, 4, 8 (steps 10 apart), and the latest.
        ("log", [0, 10, 20, 40, 80, 90]),
        ("first_last", [0, 90]),
        ("none", []),
    ],
)
def test_keep_kernels_policies(tmp_path, policy, expected):
    steps = list(range(0, 100, 10))
    kept = _save_at(tmp_path / "run", policy, steps)
    run = load_run(tmp_path / "run")
    assert run.kernel_steps.tolist() == expected
    assert run.keep_kernels == policy
    # every kernel is written (the latest is always on disk) except with "none"
    assert all(kept) == (policy != "none") and any(kept) == (policy != "none")
    for step in expected:
        np.testing.assert_array_equal(run.kernel(step), np.eye(2) * step)


def test_first_last_keeps_first_and_latest_at_every_point(tmp_path):
    with RunWriter(tmp_path / "run", META, keep_kernels="first_last") as writer:
        writer.save_kernel(5, np.ones(1))
        assert _kernel_files(tmp_path / "run") == ["step_00000005.npy"]
        writer.save_kernel(7, np.ones(1))
        writer.save_kernel(9, np.ones(1))
        assert _kernel_files(tmp_path / "run") == ["step_00000005.npy", "step_00000009.npy"]


def test_unknown_keep_kernels_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="keep_kernels must be one of 'all', 'log'.*got 'some'"):
        RunWriter(tmp_path / "run", META, keep_kernels="some")
    assert not (tmp_path / "run").exists()
    assert KEEP_KERNELS == ("all", "log", "first_last", "none")


# --------------------------------------------------------------------------- crashes


def test_truncated_last_line_loads_complete_records_and_warns(tmp_path):
    path = _write(tmp_path / "run", [{"step": 0, "a": 1.0}, {"step": 1, "a": 2.0}])
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "a": 3.')  # the crash cut the line here
    with pytest.warns(RuntimeWarning, match=r"skipped 1 unreadable line.*line 3 \(incomplete last line"):
        run = load_run(path)
    assert run.steps.tolist() == [0, 1]
    np.testing.assert_array_equal(run.metrics["a"], [1.0, 2.0])


def test_corrupt_middle_line_is_skipped_with_warning(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    _write(path, [{"step": 0}, {"step": 1}])
    lines = (path / "metrics.jsonl").read_text().splitlines()
    lines[1:1] = ["{garbage", '["not", "a", "record"]', '{"no_step": 1}']
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning, match="skipped 3 unreadable line.*line 2 .*line 3 .*line 4 "):
        run = load_run(path)
    assert run.steps.tolist() == [0, 1]


def test_exception_inside_writer_leaves_a_loadable_run(tmp_path):
    path = tmp_path / "run"
    with pytest.raises(RuntimeError, match="training blew up"):
        with RunWriter(path, META, keep_kernels="all") as writer:
            for step in range(3):
                writer.append({"step": step, "loss": 1.0 / (step + 1)})
                writer.save_kernel(step, np.full((2, 2), step))
            raise RuntimeError("training blew up")
    assert writer.closed
    run = load_run(path)
    assert run.meta == META
    assert run.steps.tolist() == [0, 1, 2]
    assert run.kernel_steps.tolist() == [0, 1, 2]


def test_leftover_temporary_files_are_ignored(tmp_path):
    path = _write(tmp_path / "run", [{"step": 0}], kernels=[(0, np.eye(2))])
    (path / ".meta.json.x1y2.tmp").write_text('{"half": ')
    (path / "kernels" / ".step_00000010.npy.a9b8.tmp").write_bytes(b"\x93NUMPY")
    run = load_run(path)
    assert run.meta == META
    assert run.kernel_steps.tolist() == [0]


# --------------------------------------------------------------------------- errors


def test_missing_kernel_names_file_and_available_steps(tmp_path):
    path = _write(tmp_path / "run", [], kernels=[(0, np.eye(2)), (8, np.eye(2))])
    with pytest.raises(FileNotFoundError, match=r"step_00000005\.npy .*steps \[0, 8\]"):
        load_run(path).kernel(5)
    empty = _write(tmp_path / "empty", [])
    with pytest.raises(FileNotFoundError, match="no kernels saved"):
        load_run(empty).kernel(0)


@pytest.mark.parametrize(
    "content",
    [b"not a numpy file", b"", b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order'"],
)
def test_corrupt_kernel_file_error_names_the_file(tmp_path, content):
    path = _write(tmp_path / "run", [], kernels=[(3, np.eye(4))])
    (path / "kernels" / "step_00000003.npy").write_bytes(content)
    with pytest.raises(ValueError, match=r"step_00000003\.npy is not a readable \.npy kernel"):
        load_run(path).kernel(3)


def test_pickled_kernel_is_never_unpickled(tmp_path):
    path = _write(tmp_path / "run", [], kernels=[(1, np.eye(2))])
    np.save(path / "kernels" / "step_00000001.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"step_00000001\.npy is not a readable"):
        load_run(path).kernel(1)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not an ntk_torch run directory \(no meta\.json\)"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "meta.json").write_text('{"model": "from another tool"}')
    with pytest.raises(ValueError, match="was not written by ntk_torch"):
        load_run(tmp_path)


def test_existing_run_is_refused_unless_overwrite(tmp_path):
    path = _write(tmp_path / "run", [{"step": 0}], kernels=[(0, np.eye(2))])
    with pytest.raises(FileExistsError, match="already holds an ntk_torch run; pass overwrite=True"):
        RunWriter(path, {"other": True})
    assert load_run(path).meta == META  # untouched

    with RunWriter(path, {"other": True}, overwrite=True) as writer:
        writer.append({"step": 5})
    run = load_run(path)
    assert run.meta == {"other": True}
    assert run.steps.tolist() == [5] and run.kernel_steps.tolist() == []


def test_foreign_directories_are_never_written_into(tmp_path):
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(FileExistsError, match="is not empty and is not an ntk_torch run"):
        RunWriter(tmp_path, META, overwrite=True)
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(FileExistsError, match="refusing to delete"):
        RunWriter(tmp_path, META, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "meta.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    RunWriter(empty, META).close()  # an empty directory is fine
    assert load_run(empty).meta == META


def test_bad_records_and_meta(tmp_path):
    with pytest.raises(TypeError, match="meta is not JSON-serialisable"):
        RunWriter(tmp_path / "a", {"f": object()})
    assert not (tmp_path / "a").exists()
    with RunWriter(tmp_path / "run", META) as writer:
        with pytest.raises(ValueError, match="'step'"):
            writer.append({"loss": 1.0})
        with pytest.raises(TypeError, match=r"record\['step'\] must be an int"):
            writer.append({"step": 1.5})
        with pytest.raises(TypeError, match="record at step 2 is not JSON-serialisable"):
            writer.append({"step": 2, "bad": object()})
        with pytest.raises(ValueError, match="step must be >= 0"):
            writer.save_kernel(-1, np.eye(2))
        with pytest.raises(TypeError, match="numeric"):
            writer.save_kernel(0, np.array([None]))
    assert load_run(tmp_path / "run").records == []  # nothing half-written


def test_log_policy_counts_only_successful_calls(tmp_path):
    with RunWriter(tmp_path / "run", META, keep_kernels="log") as writer:
        writer.save_kernel(0, np.eye(2))  # m = 0, kept
        with pytest.raises(TypeError):
            writer.save_kernel(1, "not a kernel")  # raises: not counted
        writer.save_kernel(2, np.eye(2))  # m = 1, kept
        writer.save_kernel(3, np.eye(2))  # m = 2, kept
        writer.save_kernel(4, np.eye(2))  # m = 3, kept only while it is the latest
        assert _kernel_files(tmp_path / "run")[-1] == "step_00000004.npy"
        writer.save_kernel(5, np.eye(2))  # m = 4, kept; step 4 is deleted
    assert load_run(tmp_path / "run").kernel_steps.tolist() == [0, 2, 3, 5]


def test_last_finite_skips_missing_and_non_finite_values(tmp_path):
    with RunWriter(tmp_path / "run", META) as writer:
        writer.append({"step": 0, "loss": 1.0, "note": "a"})
        writer.append({"step": 5, "loss": 0.5})
        writer.append({"step": 9, "loss": float("nan")})
    run = load_run(tmp_path / "run")
    assert run.last_finite("loss") == (0.5, 5)
    assert run.last_finite("note") is None and run.last_finite("absent") is None
