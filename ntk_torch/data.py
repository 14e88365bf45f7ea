r"""Built-in data sets: small, offline, seeded, and all returned as one :class:`DataSplit`.

====================  ==============  ==========================================================
name                  task            what
====================  ==============  ==========================================================
``digits``            classification  scikit-learn's 8x8 handwritten digits (1797 x 64, 10
                                      classes; bundled with scikit-learn, never downloaded),
                                      stratified split, standardised on the training split
``teacher``           regression      Gaussian (or spherical) inputs labelled by a fixed random
                                      MLP, the teacher-student setting of NTK studies
``sine``              regression      ``y = sin(frequency * x)`` on an interval, 1-d
``spoken_commands``   classification  SYNTHETIC spoken command words, log-mel (:mod:`.speech`)
``audio_folder``      classification  WAVs in label sub-folders (Speech Commands), log-mel
====================  ==============  ==========================================================

``load(name, **options)`` is what configs use; a name of the form
``"package.module:function"`` calls that function instead (see :func:`custom`).

Randomness comes only from private generators seeded by ``seed`` (``numpy`` Generators from
one ``SeedSequence``, or scikit-learn's ``random_state``): the global ``torch``, ``numpy`` and
``random`` states are never read or advanced, and the same options give the same tensors on
every machine.

Conventions (those of :class:`~ntk_torch.NTKTracker` and :mod:`ntk_torch.predict`):
inputs are ``(N, *input_shape)`` floating tensors; classification labels are ``(N,)``
``int64`` class indices (for ``nn.CrossEntropyLoss``); regression targets are ``(N, O)``
floating tensors (for ``nn.MSELoss`` against an ``(N, O)`` output).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from ._options import (
    check_bool,
    check_choice,
    check_dtype,
    check_int,
    check_options,
    check_real,
    check_seed,
    import_object,
    is_import_path,
    lookup,
)
from . import speech
from .losses import CLASSIFICATION, REGRESSION

__all__ = ["DATASETS", "TASKS", "DataSplit", "audio_folder", "custom", "digits", "load", "sine", "spoken_commands",
           "teacher"]

TASKS = (CLASSIFICATION, REGRESSION)


# --------------------------------------------------------------------------- DataSplit


@dataclass(frozen=True, eq=False, repr=False)
class DataSplit:
    """A training and a test set, with what a model and a loss need to know about them.

    Attributes:
        x_train: ``(N_train, *input_shape)`` floating inputs.
        y_train: ``(N_train,)`` ``int64`` class indices in ``[0, num_classes)`` for
            classification; ``(N_train, O)`` floating targets for regression.
        x_test: ``(N_test, *input_shape)``.
        y_test: ``(N_test,)`` or ``(N_test, O)``, as ``y_train``.
        task: ``"classification"`` or ``"regression"``.
        num_classes: the number of classes (classification), ``None`` for regression.
        name: the data set's name (a registry name or an import path).
        info: how the data was made (source, seed, options), JSON-serialisable for the
            built-in sets, for run metadata.

    ``split.train`` and ``split.test`` are the ``(x, y)`` pairs that
    :class:`~ntk_torch.NTKTracker` takes.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    task: str
    num_classes: Optional[int] = None
    name: str = "custom"
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label in ("x_train", "y_train", "x_test", "y_test"):
            value = getattr(self, label)
            if not isinstance(value, Tensor):
                raise TypeError(f"{label} must be a Tensor, got {type(value).__name__}")
            if value.dim() == 0:
                raise ValueError(f"{label} must be batched on dim 0, got a 0-d tensor")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not x.is_floating_point():
                raise TypeError(f"x_{split} must be a floating tensor, got dtype {x.dtype}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"x_test has feature shape {tuple(self.x_test.shape[1:])} but x_train has "
                f"{tuple(self.x_train.shape[1:])}"
            )
        if self.y_train.shape[1:] != self.y_test.shape[1:]:
            raise ValueError(
                f"y_test has target shape {tuple(self.y_test.shape[1:])} but y_train has "
                f"{tuple(self.y_train.shape[1:])}"
            )
        check_choice("task", self.task, TASKS)
        if self.task == CLASSIFICATION:
            self._check_labels()
        else:
            self._check_targets()
        object.__setattr__(self, "info", dict(self.info))

    def _check_labels(self) -> None:
        if self.num_classes is None:
            raise ValueError("num_classes is required for a classification task")
        check_int("num_classes", self.num_classes, minimum=1)
        for label in ("y_train", "y_test"):
            y = getattr(self, label)
            if y.dtype != torch.int64:
                raise TypeError(
                    f"{label} must hold int64 class indices for classification, got dtype "
                    f"{y.dtype}"
                )
            if y.dim() != 1:
                raise ValueError(
                    f"{label} must be (N,) class indices for classification, got shape "
                    f"{tuple(y.shape)}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"{label} has labels in [{int(y.min())}, {int(y.max())}], outside "
                    f"[0, {self.num_classes}) for num_classes={self.num_classes}"
                )

    def _check_targets(self) -> None:
        if self.num_classes is not None:
            raise ValueError(f"num_classes must be None for regression, got {self.num_classes!r}")
        for label in ("y_train", "y_test"):
            y = getattr(self, label)
            if not y.is_floating_point():
                raise TypeError(f"{label} must be floating targets for regression, got dtype {y.dtype}")
            if y.dim() < 2:
                raise ValueError(
                    f"{label} has shape {tuple(y.shape)}; regression targets are (N, O), so that "
                    "nn.MSELoss compares them with an (N, O) output without broadcasting "
                    "(use y.unsqueeze(1))"
                )

    @property
    def train(self) -> Tuple[Tensor, Tensor]:
        """``(x_train, y_train)``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> Tuple[Tensor, Tensor]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The shape of one input, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])

    @property
    def input_dim(self) -> int:
        """The number of input features, ``prod(input_shape)`` (an MLP's ``input_dim``)."""
        return math.prod(self.input_shape)

    @property
    def output_dim(self) -> int:
        """The outputs a model needs: ``num_classes`` (logits), or ``O`` for regression."""
        if self.task == CLASSIFICATION:
            return int(self.num_classes)  # type: ignore[arg-type]
        return math.prod(self.y_train.shape[1:])

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "DataSplit":
        """The same split with the tensors on ``device`` and the floating ones (inputs and
        regression targets) in ``dtype``; class labels stay ``int64``."""
        dtype = None if dtype is None else check_dtype("dtype", dtype)

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return dataclasses.replace(
            self,
            x_train=move(self.x_train),
            y_train=move(self.y_train),
            x_test=move(self.x_test),
            y_test=move(self.y_test),
        )

    def __repr__(self) -> str:
        classes = f", num_classes={self.num_classes}" if self.num_classes is not None else ""
        return (
            f"DataSplit(name={self.name!r}, task={self.task!r}{classes}, n_train={self.n_train}, "
            f"n_test={self.n_test}, input_shape={self.input_shape}, dtype={self.x_train.dtype})"
        )


# --------------------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def digits(
    *,
    test_size: Union[float, int] = 0.2,
    seed: int = 0,
    standardize: bool = True,
    images: bool = False,
    dtype: Union[torch.dtype, str] = torch.float32,
) -> DataSplit:
    r"""scikit-learn's 8x8 handwritten digits, split and standardised.

    The 1797 images (pixel intensities 0..16, 10 classes, ``sklearn.datasets.load_digits``,
    shipped inside scikit-learn) are split by ``train_test_split(stratify=y,
    random_state=seed)``, so each class keeps its share in both splits. With ``standardize``
    every feature is mapped to :math:`(x - \mu) / \sigma` with the mean and standard
    deviation of the *training* split only (the test split sees the same affine map, so its
    mean is near but not exactly 0); a feature constant on the training split (e.g. the
    always-blank corner pixels) has :math:`\sigma := 1`, i.e. it is only centred: 0 on every
    training example, as in ``sklearn.preprocessing.StandardScaler``.

    Args:
        test_size: the test fraction in ``(0, 1)`` (``ceil(test_size * 1797)`` examples)
            or the number of test examples; each split needs at least one example per class.
        seed: the split's ``random_state``, an int in ``[0, 2**32)``.
        standardize: standardise as above; ``False`` keeps raw intensities 0..16.
        images: inputs ``(N, 1, 8, 8)`` for a CNN instead of ``(N, 64)``.
        dtype: the inputs' floating dtype (or its name, ``"float64"``).

    Returns:
        A classification :class:`DataSplit` with ``num_classes=10``: ``x_train``
        ``(N_train, 64)`` (or ``(N_train, 1, 8, 8)``), ``y_train`` ``(N_train,)`` int64.
    """
    from sklearn.model_selection import train_test_split

    seed = check_seed("seed", seed)
    dtype = check_dtype("dtype", dtype)
    x, y = _digits_arrays()
    n, num_classes = len(y), 10
    n_test = _check_test_size(test_size, n, num_classes)
    check_bool("standardize", standardize)
    check_bool("images", images)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=n_test, random_state=seed, stratify=y
    )
    constant = np.flatnonzero(np.ptp(x_train, axis=0) == 0)
    if standardize:
        mean = x_train.mean(axis=0)
        scale = x_train.std(axis=0)
        scale[constant] = 1.0
        x_train, x_test = (x_train - mean) / scale, (x_test - mean) / scale
    shape = (1, 8, 8) if images else (64,)
    return DataSplit(
        x_train=torch.as_tensor(x_train, dtype=dtype).reshape(-1, *shape),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=torch.as_tensor(x_test, dtype=dtype).reshape(-1, *shape),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        task=CLASSIFICATION,
        num_classes=num_classes,
        name="digits",
        info={
            "source": "sklearn.datasets.load_digits",
            "seed": seed,
            "test_size": float(test_size) if isinstance(test_size, float) else int(test_size),
            "n_test": n_test,
            "standardize": bool(standardize),
            "statistics": "training split" if standardize else None,
            "constant_features": constant.tolist(),
            "input_shape": list(shape),
            "train_class_counts": np.bincount(y_train, minlength=num_classes).tolist(),
            "test_class_counts": np.bincount(y_test, minlength=num_classes).tolist(),
        },
    )


def _check_test_size(test_size: Any, n: int, num_classes: int) -> int:
    """The number of test examples ``test_size`` asks for, if both splits can be stratified."""
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real):
        raise TypeError(f"test_size must be a fraction or a number of examples, got {test_size!r}")
    if isinstance(test_size, numbers.Integral):
        n_test = int(test_size)
    elif 0.0 < test_size < 1.0:
        n_test = math.ceil(test_size * n)
    else:
        raise ValueError(f"test_size must be a fraction in (0, 1) or an integer count, got {test_size}")
    if not num_classes <= n_test <= n - num_classes:
        raise ValueError(
            f"test_size={test_size!r} gives {n_test} test and {n - n_test} training examples; "
            f"a stratified split of the {n} examples needs at least {num_classes} (one per "
            "class) in each"
        )
    return n_test


# --------------------------------------------------------------------------- teacher


_TEACHER_GAINS = {"tanh": 1.0, "relu": math.sqrt(2.0)}
_TEACHER_BIAS = 0.1
_ACTIVATIONS_NP: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
}
INPUTS = ("gaussian", "sphere")


def teacher(
    *,
    n_train: int = 256,
    n_test: int = 256,
    input_dim: int = 8,
    output_dim: int = 1,
    width: int = 64,
    depth: int = 2,
    noise: float = 0.0,
    seed: int = 0,
    activation: str = "tanh",
    inputs: str = "gaussian",
    dtype: Union[torch.dtype, str] = torch.float32,
) -> DataSplit:
    r"""Regression on the outputs of a fixed random MLP (teacher-student).

    Inputs are :math:`x \sim \mathcal N(0, I_d)` (``inputs="gaussian"``), or those scaled
    onto the sphere of radius :math:`\sqrt d` (``inputs="sphere"``, :math:`\|x\| = \sqrt d`
    exactly, the same typical scale). The teacher is an NTK-parametrised MLP with ``depth``
    hidden layers of ``width`` units,

    .. math::
        h_0 = x, \quad
        h_{l+1} = \phi\Big(\frac{g}{\sqrt{n_l}} W_l h_l + \beta b_l\Big), \quad
        t(x) = \frac{1}{\sqrt{n_L}} W_L h_L + \beta b_L,

    with :math:`W_l, b_l \sim \mathcal N(0, 1)`, :math:`\beta = 0.1` (Jacot et al. 2018's
    choice), :math:`\phi` = ``tanh`` (gain :math:`g = 1`) or ``relu`` (:math:`g = \sqrt 2`,
    so pre-activations keep unit scale at any depth). Training targets are
    :math:`y = t(x) + \text{noise}\cdot\varepsilon`, :math:`\varepsilon \sim \mathcal N(0, I)`;
    test targets are the noiseless :math:`t(x)`, so the test loss measures how well the
    teacher itself is learnt.

    The teacher's weights, the training inputs, the test inputs and the label noise come from
    four independent streams of ``numpy.random.SeedSequence(seed)``, so for a fixed seed the
    teacher and the test set do not depend on ``n_train`` or ``noise``, and the training sets
    are nested: ``n_train=100`` gives the first 100 examples of ``n_train=1000``.

    Args:
        n_train, n_test: numbers of examples (``>= 1``).
        input_dim: ``d``, the input dimension.
        output_dim: ``O``, the number of outputs of the teacher.
        width, depth: the teacher's hidden width (``>= 1``) and number of hidden layers
            (``>= 0``; 0 is a linear teacher).
        noise: the standard deviation of the Gaussian label noise on training targets.
        seed: an int in ``[0, 2**32)``.
        activation: ``"tanh"`` or ``"relu"``.
        inputs: ``"gaussian"`` or ``"sphere"``.
        dtype: the floating dtype of inputs and targets (computed in float64).

    Returns:
        A regression :class:`DataSplit`: ``x`` ``(N, input_dim)``, ``y`` ``(N, output_dim)``.
    """
    n_train = check_int("n_train", n_train, minimum=1)
    n_test = check_int("n_test", n_test, minimum=1)
    input_dim = check_int("input_dim", input_dim, minimum=1)
    output_dim = check_int("output_dim", output_dim, minimum=1)
    width = check_int("width", width, minimum=1)
    depth = check_int("depth", depth, minimum=0)
    noise = check_real("noise", noise, minimum=0.0)
    seed = check_seed("seed", seed)
    check_choice("activation", activation, _ACTIVATIONS_NP)
    check_choice("inputs", inputs, INPUTS)
    dtype = check_dtype("dtype", dtype)

    weights_rng, train_rng, test_rng, noise_rng = _streams(seed, 4)
    target = _teacher_network(weights_rng, [input_dim] + [width] * depth + [output_dim], activation)

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.standard_normal((n, input_dim))
        if inputs == "sphere":
            x *= math.sqrt(input_dim) / np.linalg.norm(x, axis=1, keepdims=True)
        return x

    x_train, x_test = draw(train_rng, n_train), draw(test_rng, n_test)
    y_train = target(x_train) + noise * noise_rng.standard_normal((n_train, output_dim))
    return DataSplit(
        x_train=torch.as_tensor(x_train, dtype=dtype),
        y_train=torch.as_tensor(y_train, dtype=dtype),
        x_test=torch.as_tensor(x_test, dtype=dtype),
        y_test=torch.as_tensor(target(x_test), dtype=dtype),
        task=REGRESSION,
        name="teacher",
        info={
            "teacher": f"NTK-parametrised MLP, {depth} hidden layer(s) of {width} {activation} units",
            "inputs": inputs,
            "noise": noise,
            "noise_on": "training targets",
            "seed": seed,
        },
    )


def _teacher_network(
    rng: np.random.Generator, sizes: Sequence[int], activation: str
) -> Callable[[np.ndarray], np.ndarray]:
    """The teacher of :func:`teacher`: an NTK-parametrised MLP with layer widths ``sizes``
    (input first), weights and biases drawn from ``rng``, a linear readout."""
    layers = [
        (rng.standard_normal((fan_out, fan_in)), rng.standard_normal(fan_out))
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
    ]
    phi, gain = _ACTIVATIONS_NP[activation], _TEACHER_GAINS[activation]
    readout = len(layers) - 1

    def target(x: np.ndarray) -> np.ndarray:
        h = x
        for index, (w, b) in enumerate(layers):
            scale = 1.0 if index == readout else gain  # the readout is linear
            z = scale * h @ w.T / math.sqrt(w.shape[1]) + _TEACHER_BIAS * b
            h = z if index == readout else phi(z)
        return h

    return target


# --------------------------------------------------------------------------- sine


def sine(
    *,
    n_train: int = 64,
    n_test: int = 256,
    noise: float = 0.0,
    seed: int = 0,
    low: float = -math.pi,
    high: float = math.pi,
    frequency: float = 1.0,
    dtype: Union[torch.dtype, str] = torch.float32,
) -> DataSplit:
    r"""1-d regression of :math:`y = \sin(\text{frequency}\cdot x)` on ``[low, high]``.

    Training inputs are uniform on the interval (a private generator seeded by ``seed``),
    with targets :math:`\sin(\omega x) + \text{noise}\cdot\varepsilon`,
    :math:`\varepsilon \sim \mathcal N(0, 1)`; test inputs are ``n_test`` evenly spaced
    points from ``low`` to ``high`` (sorted, for plotting the learnt curve) with noiseless
    targets. As in :func:`teacher`, inputs and noise are separate streams: training sets
    are nested in ``n_train`` and the inputs do not depend on ``noise``.

    Args:
        n_train, n_test: numbers of examples (``>= 1``).
        noise: the standard deviation of the Gaussian noise on training targets.
        seed: an int in ``[0, 2**32)``.
        low, high: the interval, ``low < high``.
        frequency: :math:`\omega`.
        dtype: the floating dtype of inputs and targets (computed in float64).

    Returns:
        A regression :class:`DataSplit`: ``x`` ``(N, 1)``, ``y`` ``(N, 1)``.
    """
    n_train = check_int("n_train", n_train, minimum=1)
    n_test = check_int("n_test", n_test, minimum=1)
    noise = check_real("noise", noise, minimum=0.0)
    seed = check_seed("seed", seed)
    low, high = check_real("low", low), check_real("high", high)
    if not low < high:
        raise ValueError(f"low must be less than high, got low={low}, high={high}")
    frequency = check_real("frequency", frequency)
    dtype = check_dtype("dtype", dtype)

    inputs_rng, noise_rng = _streams(seed, 2)
    x_train = inputs_rng.uniform(low, high, size=(n_train, 1))
    x_test = np.linspace(low, high, n_test).reshape(n_test, 1)
    y_train = np.sin(frequency * x_train) + noise * noise_rng.standard_normal((n_train, 1))
    return DataSplit(
        x_train=torch.as_tensor(x_train, dtype=dtype),
        y_train=torch.as_tensor(y_train, dtype=dtype),
        x_test=torch.as_tensor(x_test, dtype=dtype),
        y_test=torch.as_tensor(np.sin(frequency * x_test), dtype=dtype),
        task=REGRESSION,
        name="sine",
        info={
            "interval": [low, high],
            "frequency": frequency,
            "noise": noise,
            "noise_on": "training targets",
            "seed": seed,
        },
    )


def _streams(seed: int, count: int) -> Sequence[np.random.Generator]:
    """``count`` independent private generators from ``SeedSequence(seed)``."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(count)]


# --------------------------------------------------------------------------- custom


_RETURN_FORMS = (
    "a DataSplit, a (train, test) pair where each is (x, y) tensors or a map-style "
    "Dataset of (x, y) examples, or (x_train, y_train, x_test, y_test)"
)


def custom(path: str, /, **kwargs: Any) -> DataSplit:
    """The data returned by the function at import path ``"package.module:function"``,
    called with ``**kwargs``.

    The function may return

    - a :class:`DataSplit` (returned as it is);
    - ``(train, test)``, each either ``(x, y)`` tensors (numpy arrays are converted) or a
      map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs (stacked with
      ``default_collate``);
    - ``(x_train, y_train, x_test, y_test)``.

    The task is read from the labels: integer ``(N,)`` labels are classification with
    ``num_classes = max label + 1``; floating ``(N, O)`` targets are regression.

    Raises:
        ValueError: ``path`` is malformed.
        ImportError / AttributeError: the module cannot be imported / lacks the function.
        TypeError: an option the function does not take, or it returns none of the forms
            above.
    """
    function = import_object(path, "function")
    check_options(function, kwargs, f"data function {path!r}")
    result = function(**kwargs)
    if isinstance(result, DataSplit):
        return result
    where = f"{path} returned"
    if isinstance(result, (tuple, list)) and len(result) == 4:
        for index, part in enumerate(result):
            if not _is_array(part):
                raise TypeError(
                    f"{where} 4 items but item {index} is {_describe(part)}, not a tensor; "
                    f"expected {_RETURN_FORMS}"
                )
        train: Any = (result[0], result[1])
        test: Any = (result[2], result[3])
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        if all(_is_array(part) for part in result):
            raise TypeError(
                f"{where} a single (x, y) pair; return separate training and test sets: "
                f"{_RETURN_FORMS}"
            )
        train, test = result
    else:
        raise TypeError(f"{where} {_describe(result)}; expected {_RETURN_FORMS}")
    x_train, y_train = _as_pair(train, f"{where} a training set that is")
    x_test, y_test = _as_pair(test, f"{where} a test set that is")

    if y_train.dtype == torch.bool or not (y_train.is_floating_point() or _is_integer(y_train)):
        raise TypeError(
            f"{where} labels of dtype {y_train.dtype}; use int64 class indices (classification) "
            "or floating targets (regression)"
        )
    if y_train.is_floating_point():
        task, num_classes = REGRESSION, None
    else:
        task = CLASSIFICATION
        y_train, y_test = y_train.long(), y_test.long()
        num_classes = int(max(y_train.max(), y_test.max())) + 1 if y_train.numel() else 1
    try:
        return DataSplit(
            x_train, y_train, x_test, y_test, task=task, num_classes=num_classes, name=path,
            info={"source": path},
        )
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where} data that does not form a DataSplit: {error}") from error


def _is_array(value: Any) -> bool:
    return isinstance(value, (Tensor, np.ndarray))


def _is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _as_pair(data: Any, where: str) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from ``(x, y)`` tensors/arrays or a map-style Dataset."""
    if isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{where} a {type(data).__name__} without __len__; expected {_RETURN_FORMS}") from None
        items = [data[i] for i in range(n)]
        if not items or not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
            raise TypeError(f"{where} a Dataset whose items are not (x, y) pairs (or that is empty)")
        x, y = default_collate(items)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(_is_array(part) for part in data):
        x, y = (torch.as_tensor(part) for part in data)
    else:
        raise TypeError(f"{where} {_describe(data)}; expected {_RETURN_FORMS}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{where} made of {type(x).__name__} inputs and {type(y).__name__} labels; expected tensors")
    return x, y


# --------------------------------------------------------------------------- speech


def spoken_commands(*, n_train: int = 400, n_test: int = 200, seconds: float = 0.5, n_mels: int = 32,
                    seed: int = 0, dtype: Union[torch.dtype, str] = torch.float32) -> DataSplit:
    """SYNTHETIC spoken command words (``speech.WORDS``: yes, no, up, down, left, right, on,
    off, stop, go; balanced labels) from the source-filter synthesiser of
    :mod:`ntk_torch.speech` (a new speaker, onset, stretch and noise level per utterance,
    all from one Generator seeded by ``seed``), as log-mel features ``(N, n_mels, frames)``,
    ``frames = 1 + round(16000 seconds) // 160``, standardised per mel band on the training split."""
    n_train, n_test = check_int("n_train", n_train, minimum=10), check_int("n_test", n_test, minimum=10)
    seconds, seed, dtype = speech.check_seconds(seconds), check_seed("seed", seed), check_dtype("dtype", dtype)
    waves, labels = speech.synthetic_commands(n_train + n_test, seconds, seed)
    info = {"source": "synthetic (ntk_torch.speech source-filter synthesiser)", "seed": seed,
            "labels": list(speech.WORDS), "seconds": seconds, "n_mels": n_mels}
    return _speech_split(waves, labels, n_train, n_mels, dtype, "spoken_commands", info)


def audio_folder(path: str, *, seconds: float = 1.0, n_mels: int = 32, test_size: Union[float, int] = 0.2,
                 seed: int = 0, dtype: Union[torch.dtype, str] = torch.float32) -> DataSplit:
    """Users' recordings ``path/<label>/*.wav`` (Speech Commands layout, 16-bit PCM, resampled
    to 16 kHz, padded or cut to ``seconds``: :func:`ntk_torch.speech.read_wav_folder`) as
    :func:`spoken_commands`'s features; ``train_test_split(stratify=y, random_state=seed)``;
    classes: the sorted label folder names (``info["labels"]``)."""
    from sklearn.model_selection import train_test_split

    seconds, seed, dtype = speech.check_seconds(seconds), check_seed("seed", seed), check_dtype("dtype", dtype)
    waves, labels, names = speech.read_wav_folder(path, int(round(seconds * speech.SAMPLE_RATE)))
    n_test = _check_test_size(test_size, len(labels), len(names))
    train, test = train_test_split(np.arange(len(labels)), test_size=n_test, random_state=seed, stratify=labels)
    info = {"source": f"WAV folder {path}", "labels": names, "seed": seed, "seconds": seconds, "n_mels": n_mels}
    index = np.concatenate([train, test])
    return _speech_split(waves[index], labels[index], len(train), n_mels, dtype, "audio_folder", info)


def _speech_split(waves: np.ndarray, labels: np.ndarray, n_train: int, n_mels: int, dtype: torch.dtype,
                  name: str, info: Dict[str, Any]) -> DataSplit:
    """The split of :func:`ntk_torch.speech.standardised_log_mel` features, the first ``n_train`` training."""
    features = speech.standardised_log_mel(waves, n_train, check_int("n_mels", n_mels, minimum=4)).to(dtype)
    y, info = torch.as_tensor(labels, dtype=torch.int64), {**info, "input_shape": list(features.shape[1:])}
    return DataSplit(x_train=features[:n_train], y_train=y[:n_train], x_test=features[n_train:], y_test=y[n_train:],
                     task=CLASSIFICATION, num_classes=len(info["labels"]), name=name, info=info)


# --------------------------------------------------------------------------- registry


DATASETS: Mapping[str, Callable[..., DataSplit]] = MappingProxyType(
    {"audio_folder": audio_folder, "digits": digits, "sine": sine, "spoken_commands": spoken_commands,
     "teacher": teacher}
)
"""The built-in data sets by name (read-only)."""


def load(name: str, **options: Any) -> DataSplit:
    """The data set ``name`` built with ``options``, as configs ask for it
    (``data: {name: digits, options: {seed: 1}}`` -> ``load("digits", seed=1)``).

    ``name`` is a key of :data:`DATASETS` or an import path ``"package.module:function"``
    (see :func:`custom`).

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or a bad value.
        TypeError: an unknown option (the message lists the valid ones) or a value of the
            wrong type.
    """
    if is_import_path(name):
        return custom(name, **options)
    builder = lookup(DATASETS, name, "data set")
    check_options(builder, options, f"data set {name!r}")
    return builder(**options)
