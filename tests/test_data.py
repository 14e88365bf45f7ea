"""Built-in data sets: shapes, seeding, RNG hygiene, standardisation, custom import paths."""

from __future__ import annotations

import json
import math
import random
import sys
import textwrap

import numpy as np
import pytest
import torch

from ntk_torch import data
from ntk_torch.data import DataSplit


@pytest.fixture
def untouched_rngs():
    """Fails the test if it advanced the global torch, numpy or random generators."""
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    assert torch.equal(torch.get_rng_state(), torch_state), "the global torch RNG was used"
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:], (
        "the global numpy RNG was used"
    )
    assert random.getstate() == python_state, "the global random RNG was used"


def same(a: DataSplit, b: DataSplit) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_test", "y_test"))


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_labels():
    split = data.digits()
    assert (split.n_train, split.n_test) == (1437, 360)  # ceil(0.2 * 1797) test examples
    assert split.x_train.shape == (1437, 64) and split.x_test.shape == (360, 64)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert split.task == "classification" and split.num_classes == 10 and split.output_dim == 10
    assert split.train == (split.x_train, split.y_train) and split.input_dim == 64
    assert set(split.y_train.tolist()) == set(range(10))
    json.dumps(split.info)  # run metadata


def test_digits_stratified_split_keeps_class_shares():
    split = data.digits(test_size=0.25, seed=3)
    y = torch.cat([split.y_train, split.y_test])
    share = torch.bincount(y, minlength=10) / len(y)
    expected_test = share * split.n_test
    assert (torch.bincount(split.y_test, minlength=10) - expected_test).abs().max() <= 1
    assert split.info["test_class_counts"] == torch.bincount(split.y_test, minlength=10).tolist()


def test_digits_standardised_with_training_statistics_only():
    split = data.digits(dtype=torch.float64)
    raw = data.digits(standardize=False, dtype=torch.float64)
    constant = split.info["constant_features"]
    varying = [j for j in range(64) if j not in constant]
    assert constant, "the blank corner pixels are constant on the training split"
    assert torch.allclose(split.x_train.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(split.x_train[:, varying].std(0, unbiased=False), torch.ones(len(varying), dtype=torch.float64))
    assert torch.all(split.x_train[:, constant] == 0) and torch.isfinite(split.x_test).all()
    # the test split went through the training split's affine map, not its own statistics
    assert split.x_test[:, varying].mean(0).abs().max() > 1e-3
    mean, scale = raw.x_train.mean(0), raw.x_train.std(0, unbiased=False)
    scale[constant] = 1.0
    assert torch.allclose(split.x_test, (raw.x_test - mean) / scale)
    assert raw.x_train.min() == 0 and raw.x_train.max() == 16


def test_digits_seeded_and_leaves_global_rngs_alone(untouched_rngs):
    first, again, other = data.digits(seed=1), data.digits(seed=1), data.digits(seed=2)
    assert same(first, again)
    assert not torch.equal(first.y_test, other.y_test)


def test_digits_images_and_count_test_size():
    split = data.digits(images=True, test_size=100, dtype="float64")
    assert split.x_train.shape == (1697, 1, 8, 8) and split.x_test.shape == (100, 1, 8, 8)
    assert split.x_train.dtype == torch.float64 and split.input_dim == 64
    flat = data.digits(test_size=100)
    assert torch.allclose(split.x_test.flatten(1).float(), flat.x_test)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"test_size": 1.5}, ValueError, "test_size must be a fraction in"),
        ({"test_size": 5}, ValueError, "needs at least 10"),
        ({"test_size": "0.2"}, TypeError, "test_size"),
        ({"seed": -1}, ValueError, "seed must be at least 0"),
        ({"seed": 2**32}, ValueError, "seed must be less than 2"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"dtype": "int32"}, ValueError, "dtype must be one of"),
    ],
)
def test_digits_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        data.digits(**options)


# --------------------------------------------------------------------------- teacher


def test_teacher_shapes_and_targets(untouched_rngs):
    split = data.teacher(n_train=50, n_test=30, input_dim=5, output_dim=3, width=32, depth=3)
    assert split.x_train.shape == (50, 5) and split.y_train.shape == (50, 3)
    assert split.x_test.shape == (30, 5) and split.y_test.shape == (30, 3)
    assert split.task == "regression" and split.num_classes is None and split.output_dim == 3
    assert split.y_train.std() > 0.1, "the teacher's targets should vary with the input"
    json.dumps(split.info)


def test_teacher_is_seeded_and_nested_in_n_train():
    small, large = data.teacher(n_train=40, seed=5), data.teacher(n_train=200, seed=5)
    assert torch.equal(small.x_train, large.x_train[:40]) and torch.equal(small.y_train, large.y_train[:40])
    assert torch.equal(small.x_test, large.x_test) and torch.equal(small.y_test, large.y_test)
    assert same(small, data.teacher(n_train=40, seed=5))
    other = data.teacher(n_train=40, seed=6)
    assert not torch.equal(small.x_train, other.x_train)


def test_teacher_noise_only_on_training_targets():
    clean, noisy = data.teacher(seed=2), data.teacher(seed=2, noise=0.5)
    assert torch.equal(clean.x_train, noisy.x_train) and torch.equal(clean.y_test, noisy.y_test)
    residual = noisy.y_train - clean.y_train
    assert 0.4 < float(residual.std()) < 0.6


def affine_fit(split: DataSplit):
    """Least-squares affine map fitted on the training split: (train residual, test residual)."""
    design = lambda x: torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # noqa: E731
    coef = torch.linalg.lstsq(design(split.x_train), split.y_train).solution
    return (
        float((design(split.x_train) @ coef - split.y_train).abs().max()),
        float((design(split.x_test) @ coef - split.y_test).abs().max()),
    )


def test_teacher_depth_zero_is_affine_and_deeper_teachers_are_not():
    # one affine teacher labels both splits: a fit on the training split predicts the test split
    linear = data.teacher(n_train=40, n_test=10, input_dim=3, output_dim=2, depth=0, dtype=torch.float64)
    assert max(affine_fit(linear)) < 1e-10
    deep = data.teacher(n_train=40, n_test=10, input_dim=3, depth=2, activation="relu", dtype=torch.float64)
    assert affine_fit(deep)[0] > 1e-2


def test_teacher_sphere_inputs():
    split = data.teacher(input_dim=12, inputs="sphere", dtype=torch.float64)
    assert torch.allclose(split.x_train.norm(dim=1), torch.full((256,), math.sqrt(12), dtype=torch.float64))


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"n_train": 0}, ValueError, "n_train must be at least 1"),
        ({"width": 0}, ValueError, "width must be at least 1"),
        ({"depth": -1}, ValueError, "depth must be at least 0"),
        ({"noise": -0.1}, ValueError, "noise must be at least 0"),
        ({"noise": float("nan")}, ValueError, "noise must be finite"),
        ({"activation": "gelu"}, ValueError, "activation must be one of 'tanh', 'relu'"),
        ({"inputs": "cube"}, ValueError, "inputs must be one of 'gaussian', 'sphere'"),
        ({"input_dim": True}, TypeError, "input_dim must be an integer"),
    ],
)
def test_teacher_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        data.teacher(**options)


# --------------------------------------------------------------------------- sine


def test_sine(untouched_rngs):
    split = data.sine(n_train=20, n_test=50, low=-2.0, high=3.0, frequency=2.0, dtype=torch.float64)
    assert split.x_train.shape == (20, 1) and split.y_test.shape == (50, 1)
    assert torch.equal(split.y_train, torch.sin(2.0 * split.x_train))
    assert split.x_train.min() >= -2.0 and split.x_train.max() <= 3.0
    assert torch.allclose(split.x_test[:, 0], torch.linspace(-2.0, 3.0, 50, dtype=torch.float64))
    noisy = data.sine(n_train=20, noise=0.1, seed=0)
    assert torch.equal(noisy.x_train, data.sine(n_train=20, seed=0).x_train)
    assert not torch.equal(noisy.y_train, torch.sin(noisy.x_train))
    assert not torch.equal(data.sine(seed=1).x_train, data.sine(seed=2).x_train)
    with pytest.raises(ValueError, match="low must be less than high"):
        data.sine(low=1.0, high=1.0)


# --------------------------------------------------------------------------- DataSplit


def test_datasplit_validates_and_converts():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    split = DataSplit(x, y, x[:2], y[:2], task="classification", num_classes=3, name="toy")
    moved = split.to(dtype=torch.float64)
    assert moved.x_train.dtype == torch.float64 and moved.y_train.dtype == torch.int64
    assert "n_train=4" in repr(split) and "num_classes=3" in repr(split)
    with pytest.raises(ValueError, match="x_train has 4 examples but y_train has 3"):
        DataSplit(x, y[:3], x, y, task="classification", num_classes=3)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        DataSplit(x, y, x, y, task="classification", num_classes=2)
    with pytest.raises(ValueError, match="task must be one of"):
        DataSplit(x, y, x, y, task="ranking")
    with pytest.raises(ValueError, match=r"regression targets are \(N, O\)"):
        DataSplit(x, y.float(), x, y.float(), task="regression")
    with pytest.raises(ValueError, match="x_test has feature shape"):
        DataSplit(x, y, x[:, :2], y, task="classification", num_classes=3)


# --------------------------------------------------------------------------- registry


def test_load_by_name_matches_the_functions():
    assert same(data.load("digits", seed=1), data.digits(seed=1))
    assert same(data.load("sine", n_train=5), data.sine(n_train=5))
    assert set(data.DATASETS) == {"audio_folder", "digits", "sine", "spoken_commands", "teacher"}


def test_load_unknown_name_and_option():
    with pytest.raises(ValueError, match=r"unknown data set 'mnist'; valid names: audio_folder, digits, sine, spoken_commands, teacher"):
        data.load("mnist")
    with pytest.raises(TypeError, match=r"unknown option 'sede' for data set 'digits'; valid options: test_size, seed"):
        data.load("digits", sede=1)


# --------------------------------------------------------------------------- custom

USER_MODULE = """
import numpy as np
import torch
from torch.utils.data import TensorDataset

from ntk_torch.data import DataSplit


def pairs(n=6, classes=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 4, 2, generator=g)
    y = torch.arange(n + 4) % classes
    return (x[:n], y[:n]), (x[n:], y[n:])


def four(n=5):
    x = np.linspace(0.0, 1.0, 2 * n).reshape(2 * n, 1)
    return x[:n], np.cos(x[:n]), x[n:], np.cos(x[n:])


def datasets():
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    return TensorDataset(x[:5], y[:5]), TensorDataset(x[5:], y[5:])


def split():
    x, y = torch.zeros(2, 1), torch.zeros(2, 1)
    return DataSplit(x, y, x, y, task="regression", name="mine")


def single_pair():
    return torch.zeros(3, 1), torch.zeros(3)


def wrong_type():
    return {"x": torch.zeros(3, 1)}


def bad_labels():
    x = torch.zeros(3, 1)
    return (x, torch.tensor([True, False, True])), (x, torch.tensor([True, False, True]))


NOT_CALLABLE = 3
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """A module ``ntk_user_data`` on sys.path, as a user's own package would be."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "ntk_user_data.py").write_text(textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(folder))
    yield "ntk_user_data"
    sys.path.remove(str(folder))
    sys.modules.pop("ntk_user_data", None)


def test_custom_pairs_are_classification(user_module):
    split = data.load(f"{user_module}:pairs", n=6, classes=3)
    assert split.task == "classification" and split.num_classes == 3
    assert split.x_train.shape == (6, 2) and split.y_test.tolist() == [0, 1, 2, 0]
    assert split.name == f"{user_module}:pairs"


def test_custom_four_arrays_and_datasets_are_regression(user_module):
    split = data.custom(f"{user_module}:four", n=5)
    assert split.task == "regression" and split.y_train.shape == (5, 1) and split.x_test.dtype == torch.float64
    assert torch.allclose(split.y_test, torch.cos(split.x_test))
    from_datasets = data.custom(f"{user_module}:datasets")
    assert from_datasets.task == "regression" and from_datasets.y_test.shape == (3, 2)
    assert data.custom(f"{user_module}:split").name == "mine"


@pytest.mark.parametrize(
    "path, error, match",
    [
        ("no_colon_here", ValueError, "path must look like"),
        ("a.b:c:d", ValueError, "path must look like"),
        ("a-b:c", ValueError, "path must look like"),
        (":pairs", ValueError, "path must look like"),
        ("ntk_no_such_module_xyz:load", ImportError, "cannot import module 'ntk_no_such_module_xyz'"),
        ("{m}:missing", AttributeError, "'{m}' has no attribute 'missing'"),
        ("{m}:NOT_CALLABLE", TypeError, "names a int, not a callable function"),
        ("{m}:single_pair", TypeError, "a single \\(x, y\\) pair"),
        ("{m}:wrong_type", TypeError, "returned a dict; expected a DataSplit"),
        ("{m}:bad_labels", TypeError, "labels of dtype torch.bool"),
    ],
)
def test_custom_errors(user_module, path, error, match):
    with pytest.raises(error, match=match.format(m=user_module)):
        data.custom(path.format(m=user_module))


def test_custom_unknown_option(user_module):
    with pytest.raises(TypeError, match=r"unknown option 'size' for data function .*valid options: n, classes"):
        data.load(f"{user_module}:pairs", size=3)


def test_custom_path_must_be_a_string():
    with pytest.raises(TypeError, match="path must be a string"):
        data.custom(42)
