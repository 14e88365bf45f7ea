"""The function-space problem of the linearised dynamics: kernels as matrices, checked inputs.

:func:`prepare` checks the training kernel (symmetric, finite, of a set with itself), the
initial outputs, the targets (by the loss, :mod:`ntk_torch.losses`) and the optional test
kernel, and casts everything to one dtype; :class:`Problem` holds the result and turns
recorded outputs into a :class:`Prediction`. A kernel acts on ``(N, O)`` function-space
vectors as the matrix :class:`KernelMatrix` (its layout's matrix view,
:mod:`ntk_torch.layout`), whose eigendecomposition is computed once and kept.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..layout import FULL, TRACE, Layout, layout_of
from ..losses import Loss
from ..steps import dense_then_log


# --------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """Predicted trajectory of a linearised network, recorded at ``R`` steps.

    Attributes:
        steps: ``(R,)`` the recorded optimizer steps (int64) for :func:`gd`; for
            :func:`gradient_flow` the recorded times (float), in units where time ``t`` at
            learning rate ``lr`` corresponds to ``t`` gradient-descent steps of size ``lr``;
            ``[inf]`` for :func:`kernel_regression`.
        train_outputs: ``(R, N, O)`` predicted outputs on the training inputs.
        train_loss: ``(R,)`` the loss on the training set.
        loss: the loss's name (``"mse"``, ``"cross_entropy"`` or the callable's name).
        approximation: ``"exact"`` for full kernels, ``"isotropic"`` for trace kernels used
            as ``(K_trace / O) (x) I_O``.
        method: how the trajectory was computed: ``"closed_form"`` (MSE through one
            eigendecomposition), ``"iteration"`` (step by step), ``"dopri5"`` (adaptive ODE
            integration) or ``"kernel_regression"``.
        train_accuracy: ``(R,)`` fraction of argmax-correct examples, when the targets are
            classes (``cross_entropy``, or integer labels ``(N,)``); else ``None``.
        test_outputs: ``(R, M, O)`` predicted outputs on the test inputs, or ``None``.
        test_loss: ``(R,)`` test loss, when ``y_test`` was given; else ``None``.
        test_accuracy: ``(R,)`` test accuracy, as for ``train_accuracy``.
    """

    steps: Tensor
    train_outputs: Tensor
    train_loss: Tensor
    loss: str
    approximation: str
    method: str
    train_accuracy: Optional[Tensor] = None
    test_outputs: Optional[Tensor] = None
    test_loss: Optional[Tensor] = None
    test_accuracy: Optional[Tensor] = None

    @property
    def exact(self) -> bool:
        """``True`` when computed from full kernels, ``False`` for the isotropic approximation."""
        return self.approximation == "exact"


POWER_ITERATIONS = 200
"""The most kernel products :meth:`KernelMatrix.top_eigenvalue` spends on an estimate."""


# --------------------------------------------------------------------------------------
# Kernels as linear operators on (N, O) function-space vectors
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelMatrix:
    """A kernel as a matrix acting on function-space vectors.

    ``matrix`` is ``(N1 O, N2 O)`` for a full kernel and ``(N1, N2) = K_trace / O`` for the
    isotropic approximation ``(K_trace / O) (x) I_O``. :meth:`vec` maps an ``(N, O)``
    vector to the operand of ``matrix`` — ``(N O, 1)`` or ``(N, O)`` — so that every
    formula below is written once for both kinds.
    """

    name: str
    matrix: Tensor
    n_outputs: int
    isotropic: bool

    @classmethod
    def from_tensor(cls, name: str, k: Tensor, n_outputs: int) -> "KernelMatrix":
        """The matrix of a full or trace kernel ``k`` (checked by :func:`kernel_layout`)."""
        layout = layout_of(k, name)
        matrix = layout.matrix(k)
        if layout.sums_outputs:
            return cls(name, matrix / n_outputs, n_outputs, True)
        return cls(name, matrix, layout.num_outputs(k), False)

    def symmetrized(self) -> "KernelMatrix":
        """``(K + K^T) / 2`` after :meth:`check_symmetric`: exactly symmetric."""
        self.check_symmetric()
        return KernelMatrix(self.name, (self.matrix + self.matrix.T) / 2, self.n_outputs, self.isotropic)

    def vec(self, a: Tensor) -> Tensor:
        return a if self.isotropic else a.reshape(-1, 1)

    def unvec(self, v: Tensor) -> Tensor:
        return v.reshape(-1, self.n_outputs)

    def __matmul__(self, a: Tensor) -> Tensor:
        """``K a`` for ``a`` of shape ``(N2, O)``; returns ``(N1, O)``."""
        return self.unvec(self.matrix @ self.vec(a))

    @property
    def units(self) -> float:
        """Factor from :attr:`matrix` back to the kernel the user passed (O for a trace)."""
        return float(self.n_outputs) if self.isotropic else 1.0

    @property
    def tolerance(self) -> float:
        """Absolute tolerance on asymmetry and negative eigenvalues: rounding, not error.

        ``max(sqrt(eps), n eps) * max_i |K_ii|`` for an ``n x n`` matrix, with ``eps`` at
        least float32's, so that a kernel computed in float32 and cast to float64 passes;
        a kernel that is wrong (not ``J J^T``) is off by far more.
        """
        eps = max(torch.finfo(self.matrix.dtype).eps, torch.finfo(torch.float32).eps)
        size = self.matrix.shape[0]
        scale = float(self.matrix.diagonal().abs().max()) if size else 0.0
        return max(math.sqrt(eps), size * eps) * scale

    def check_symmetric(self) -> None:
        asymmetry = float((self.matrix - self.matrix.T).abs().max()) if self.matrix.numel() else 0.0
        if asymmetry > self.tolerance:
            entry = "|K[i,j] - K[j,i]|" if self.isotropic else "|K[i,j,a,b] - K[j,i,b,a]|"
            raise ValueError(
                f"{self.name} is not symmetric: max {entry} = {asymmetry * self.units:.3e} "
                f"(tolerance {self.tolerance * self.units:.3e}); a training kernel must be "
                "computed between the training inputs and themselves"
            )

    @cached_property
    def eigh(self) -> Tuple[Tensor, Tensor]:
        """Eigenvalues (ascending) and orthonormal eigenvectors, after the PSD check.

        Eigenvalues within the tolerance below zero are rounding and are set to zero, so
        that closed forms cannot grow like ``(1 + |eta lambda|)^t`` over long horizons.
        """
        values, vectors = torch.linalg.eigh(self.matrix)
        self._raise_if_negative(values)
        return values.clamp_min(0), vectors

    def top_eigenvalue(self, exact: bool = True) -> float:
        """The largest eigenvalue: from :attr:`eigh`, or, with ``exact=False`` while
        :attr:`eigh` is not computed, by power iteration from a fixed start (the Rayleigh
        quotient, a lower bound, stopped at a relative change below 1e-6 or after
        :data:`POWER_ITERATIONS` products)."""
        if exact or "eigh" in self.__dict__:
            return float(self.eigh[0][-1])
        vector = torch.ones(self.matrix.shape[0], 1, dtype=self.matrix.dtype, device=self.matrix.device)
        vector = vector + torch.linspace(0, 1, vector.shape[0], dtype=vector.dtype, device=vector.device)[:, None]
        estimate = 0.0
        for _ in range(POWER_ITERATIONS):
            vector = vector / torch.linalg.vector_norm(vector)
            image = self.matrix @ vector
            previous, estimate = estimate, float(vector.T @ image)
            if abs(estimate - previous) <= 1e-6 * abs(estimate):
                break
            vector = image
        return estimate

    def check_psd(self) -> None:
        """Positive semi-definiteness within :attr:`tolerance`, by a shifted Cholesky."""
        shifted = self.matrix + self.tolerance * torch.eye(
            self.matrix.shape[0], dtype=self.matrix.dtype, device=self.matrix.device
        )
        if int(torch.linalg.cholesky_ex(shifted).info) != 0:
            self._raise_if_negative(torch.linalg.eigvalsh(self.matrix))

    def _raise_if_negative(self, values: Tensor) -> None:
        if values.numel() and float(values[0]) < -self.tolerance:
            count = int((values < -self.tolerance).sum())
            smallest, largest = float(values[0]) * self.units, float(values[-1]) * self.units
            raise ValueError(
                f"{self.name} is not positive semi-definite: its smallest eigenvalue is "
                f"{smallest:.3e} ({count} below the tolerance "
                f"-{self.tolerance * self.units:.3e}; largest {largest:.3e}); a kernel "
                "J J^T has no negative eigenvalues"
            )


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------
def tensor_arg(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def count(name: str, value: object) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {number}")
    return number


def same_examples(kernel_name: str, n: int, name: str, value: Tensor) -> None:
    if value.ndim == 0 or value.shape[0] != n:
        got = value.shape[0] if value.ndim else "no example dimension"
        raise ValueError(f"{kernel_name} has {n} examples but {name} has {got}")


def _full_or_trace(name: str, k: Tensor) -> Optional[Layout]:
    try:
        return layout_of(k, name, allowed=(FULL, TRACE))
    except ValueError:
        return None


def kernel_layout(name: str, k: Tensor) -> Layout:
    """The layout of a full or trace kernel of a set of inputs with itself."""
    found = _full_or_trace(name, k)
    if found is None or k.shape[0] != k.shape[1]:
        raise ValueError(
            f"{name} must be a full kernel (N, N, O, O) or a trace kernel (N, N); "
            f"got shape {tuple(k.shape)}"
        )
    return found


def check_outputs(name: str, f: Tensor, kernel_name: str, k: Tensor) -> None:
    if f.ndim != 2:
        raise ValueError(f"{name} must have shape (N, O), got {tuple(f.shape)}")
    same_examples(kernel_name, k.shape[0], name, f)
    outputs = layout_of(k, kernel_name).num_outputs(k)
    if outputs is not None and outputs != f.shape[1]:
        raise ValueError(
            f"{name} has {f.shape[1]} outputs per example but {kernel_name} has "
            f"{k.shape[-1]} (shape {tuple(k.shape)})"
        )


def check_finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def time_points(times: Union[float, Sequence[float], Tensor]) -> List[float]:
    values = times.tolist() if isinstance(times, Tensor) else times
    values = [values] if isinstance(values, numbers.Real) else list(values)
    for t in values:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"times must be non-negative finite numbers, got {t!r}")
    if not values:
        raise ValueError("times must contain at least one time")
    return sorted(set(float(t) for t in values))


def record_steps_of(steps: int, record_steps: Optional[Iterable[int]]) -> List[int]:
    if record_steps is None:
        return dense_then_log(steps)
    records = sorted(set(count("record_steps entries", s) for s in record_steps))
    if not records:
        raise ValueError("record_steps must contain at least one step")
    if records[-1] > steps:
        raise ValueError(f"record_steps must lie in [0, steps={steps}]; got {records[-1]}")
    return records


# --------------------------------------------------------------------------------------
# The problem: validated kernels, outputs and targets
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """The checked inputs of the linearised dynamics (see :func:`prepare`)."""

    kernel: KernelMatrix
    f0: Tensor
    y: Tensor
    loss: Loss
    test_kernel: Optional[KernelMatrix] = None
    f0_test: Optional[Tensor] = None
    y_test: Optional[Tensor] = None
    jtheta0: Optional[Tensor] = None
    jtheta0_test: Optional[Tensor] = None

    @property
    def approximation(self) -> str:
        return "isotropic" if self.kernel.isotropic else "exact"

    def prediction(
        self,
        steps: Tensor,
        train: Sequence[Tensor],
        test: Optional[Sequence[Tensor]],
        method: str,
    ) -> Prediction:
        """Assembles a :class:`Prediction` from the outputs at the recorded steps."""
        train_outputs = torch.stack(list(train))
        test_outputs = torch.stack(list(test)) if test is not None else None
        train_loss, train_accuracy = self._score(train_outputs, self.y)
        test_loss = test_accuracy = None
        if test_outputs is not None and self.y_test is not None:
            test_loss, test_accuracy = self._score(test_outputs, self.y_test)
        return Prediction(
            steps=steps,
            train_outputs=train_outputs,
            train_loss=train_loss,
            loss=self.loss.name,
            approximation=self.approximation,
            method=method,
            train_accuracy=train_accuracy,
            test_outputs=test_outputs,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
        )

    def _score(self, outputs: Tensor, y: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        with torch.no_grad():
            losses = torch.stack([self.loss.value(f, y).detach() for f in outputs])
            labels = self.loss.class_labels(y, outputs[0])
            if labels is None:
                return losses, None
            correct = outputs.argmax(dim=-1) == labels
            return losses, correct.to(outputs.dtype).mean(dim=-1)

    def weight_decay_values(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``J(x) theta_0`` on the training (and test) inputs, which weight decay needs."""
        jt = _jtheta0("jtheta0", self.jtheta0, self.f0)
        jtt = None
        if self.test_kernel is not None:
            jtt = _jtheta0("jtheta0_test", self.jtheta0_test, self.f0_test)
        return jt, jtt


def prepare(
    k_train_train: Tensor,
    y_train: Tensor,
    f0_train: Optional[Tensor],
    loss: Loss,
    k_test_train: Optional[Tensor] = None,
    f0_test: Optional[Tensor] = None,
    y_test: Optional[Tensor] = None,
    jtheta0: Optional[Tensor] = None,
    jtheta0_test: Optional[Tensor] = None,
) -> Problem:
    """Checks shapes and the training kernel, and casts everything to one dtype.

    A missing ``f0_train`` means zero outputs, and then so does a missing ``f0_test``.
    ``jtheta0``/``jtheta0_test`` are checked when weight decay asks for them.
    """
    k = tensor_arg("k_train_train", k_train_train)
    layout = kernel_layout("k_train_train", k)
    y = tensor_arg("y_train", y_train)
    same_examples("k_train_train", k.shape[0], "y_train", y)
    if f0_train is None:
        f0_train = _zero_outputs(layout, k, y)
        if k_test_train is not None and f0_test is None:
            kx = tensor_arg("k_test_train", k_test_train)
            f0_test = f0_train.new_zeros(kx.shape[0] if kx.ndim else 0, f0_train.shape[1])
    f0 = tensor_arg("f0_train", f0_train)
    check_outputs("f0_train", f0, "k_train_train", k)
    dtype = torch.promote_types(k.dtype, f0.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"k_train_train and f0_train must be floating point, got {dtype}")
    f0 = f0.to(dtype)
    y = loss.check_targets(y, f0, "y_train")
    check_finite("k_train_train", k)
    check_finite("f0_train", f0)
    kernel = KernelMatrix.from_tensor("k_train_train", k.to(dtype), f0.shape[1]).symmetrized()
    test_kernel, f0_test, y_test = _prepare_test(layout, k, f0, loss, k_test_train, f0_test, y_test)
    return Problem(kernel, f0, y, loss, test_kernel, f0_test, y_test, jtheta0, jtheta0_test)


def _zero_outputs(layout: Layout, k: Tensor, y: Tensor) -> Tensor:
    outputs = layout.num_outputs(k)
    if outputs is not None:
        return k.new_zeros(k.shape[0], outputs)
    if y.ndim != 2:
        raise ValueError(
            f"with a trace kernel and no f0_train, y_train must have shape (N, O) to give the "
            f"number of outputs; got {tuple(y.shape)}"
        )
    return k.new_zeros(y.shape)


_KINDS = {FULL.name: "a full kernel (M, N, O, O)", TRACE.name: "a trace kernel (M, N)"}


def _prepare_test(
    layout: Layout,
    k: Tensor,
    f0: Tensor,
    loss: Loss,
    k_test_train: Optional[Tensor],
    f0_test: Optional[Tensor],
    y_test: Optional[Tensor],
) -> Tuple[Optional[KernelMatrix], Optional[Tensor], Optional[Tensor]]:
    if k_test_train is None:
        for name, value in (("f0_test", f0_test), ("y_test", y_test)):
            if value is not None:
                raise ValueError(f"{name} was given without k_test_train")
        return None, None, None
    kx = tensor_arg("k_test_train", k_test_train)
    test_layout = _full_or_trace("k_test_train", kx)
    if test_layout is not layout:
        kind = _KINDS[test_layout.name] if test_layout is not None else f"of shape {tuple(kx.shape)}"
        raise ValueError(
            f"k_test_train is {kind} but k_train_train is {_KINDS[layout.name]}; pass both in "
            "the same mode"
        )
    if kx.shape[1] != k.shape[0]:
        raise ValueError(
            f"k_test_train has {kx.shape[1]} training examples (dim 1) but k_train_train "
            f"has {k.shape[0]}"
        )
    if kx.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"k_test_train has output dimensions {tuple(kx.shape[2:])} but k_train_train "
            f"has {tuple(k.shape[2:])}"
        )
    if f0_test is None:
        raise ValueError(
            "k_test_train was given without f0_test: pass the model's outputs on the test "
            "inputs at initialisation, shape (M, O)"
        )
    f0_test = tensor_arg("f0_test", f0_test)
    check_outputs("f0_test", f0_test, "k_test_train", kx)
    if f0_test.shape[1] != f0.shape[1]:
        raise ValueError(
            f"f0_test has {f0_test.shape[1]} outputs per example but f0_train has {f0.shape[1]}"
        )
    f0_test = f0_test.to(f0.dtype)
    check_finite("k_test_train", kx)
    check_finite("f0_test", f0_test)
    if y_test is not None:
        y_test = tensor_arg("y_test", y_test)
        same_examples("k_test_train", kx.shape[0], "y_test", y_test)
        y_test = loss.check_targets(y_test, f0_test, "y_test")
    return KernelMatrix.from_tensor("k_test_train", kx.to(f0.dtype), f0.shape[1]), f0_test, y_test


def _jtheta0(name: str, value: Optional[Tensor], like: Tensor) -> Tensor:
    if value is None:
        raise ValueError(
            f"weight_decay > 0 needs {name}: the values J(x)·θ0, shape {tuple(like.shape)}, "
            "of the Jacobian at initialisation applied to the initial parameters (one jvp "
            "with tangent θ0; LinearizedModel.jacobian_theta0(x) computes it)"
        )
    value = tensor_arg(name, value)
    if value.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but the outputs have shape {tuple(like.shape)}"
        )
    check_finite(name, value)
    return value.to(like.dtype)
