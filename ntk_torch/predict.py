r"""Linearised training dynamics in function space (Lee et al. 2019).

A network linearised around its initial parameters :math:`\theta_0`,

.. math::  f_{lin}(x; \theta) = f(x; \theta_0) + J(x) (\theta - \theta_0),
           \qquad J(x) = \partial f(x; \theta) / \partial \theta \,|_{\theta_0},

has parameter gradients :math:`\nabla_\theta L = J^\top \nabla_f L` that all lie in the row
space of the training Jacobian :math:`J`. Gradient descent therefore stays in
:math:`\theta_0 + J^\top \mathbb{R}^{N O}`, and its whole trajectory in *function space* is
determined by the empirical NTK at initialisation :math:`K = J J^\top`:

.. math::  f_{t+1} = f_t - \eta K \nabla_f L(f_t),
           \qquad f^{test}_{t+1} = f^{test}_t - \eta K_{test,train} \nabla_f L(f_t)

(Lee et al. 2019, "Wide neural networks of any depth evolve as linear models under gradient
descent", eqs. 8-11). This module computes these trajectories, without parameters, from the
kernels alone.

Conventions
-----------
* Kernels. ``full``: ``(N1, N2, O, O)`` with ``K[i, j, a, b] = <d f_a(x_i), d f_b(x_j)>``; it
  acts on function-space vectors ``v`` of shape ``(N2, O)`` as
  ``(K v)[i, a] = sum_{j, b} K[i, j, a, b] v[j, b]``, i.e. as the ``(N1 O) x (N2 O)`` matrix
  ``K.permute(0, 2, 1, 3).reshape(N1 O, N2 O)``. ``trace``: ``(N1, N2)``, the sum over ``o`` of
  ``K[i, j, o, o]``; it is used as ``(K_trace / O) (x) I_O`` — the *isotropic approximation*,
  exact when the outputs are uncoupled and identically distributed, as for wide networks —
  and every result then carries ``approximation="isotropic"``.
* Outputs ``f`` are ``(N, O)``; ``f0_train``/``f0_test`` are the model's outputs at
  initialisation, evaluated in eval mode like the kernel.
* Losses follow PyTorch's mean reductions, so predictions are for the loss users train with:
  ``"mse"`` is ``nn.MSELoss()`` (mean over the ``N O`` entries, targets ``(N, O)``),
  ``"cross_entropy"`` is ``nn.CrossEntropyLoss()`` (mean over ``N``; integer labels ``(N,)``
  or class probabilities ``(N, C)``), and a callable ``loss(f, y) -> scalar`` is
  differentiated in ``f`` with :func:`torch.func.grad`.
* ``lr``, ``momentum``, ``nesterov`` and ``weight_decay`` mean exactly what they mean in
  :class:`torch.optim.SGD` (dampening 0), and one step is one full-batch optimizer step.

Computation happens in the floating dtype of the kernel promoted with that of ``f0_train``;
pass float64 kernels for the most accurate long trajectories.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Prediction",
    "gd",
    "gradient_flow",
    "kernel_regression",
    "max_learning_rate",
    "KNOWN_LOSSES",
]

LossArg = Union[str, Callable[[Tensor, Tensor], Tensor]]

KNOWN_LOSSES: Tuple[str, ...] = ("mse", "cross_entropy")
"""Names accepted by the ``loss`` argument (a callable ``loss(f, y)`` is accepted too)."""


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


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Loss:
    """A loss in function space: its value, its gradient in ``f`` and a curvature bound.

    ``curvature(N, O)`` bounds the largest eigenvalue of the Hessian of the loss in ``f``
    (``None`` when unknown, for callables).
    """

    name: str
    value: Callable[[Tensor, Tensor], Tensor]
    gradient: Callable[[Tensor, Tensor], Tensor]
    curvature: Optional[Callable[[int, int], float]]
    check_targets: Callable[[str, Tensor, Tensor], Tensor]


def _mse_value(f: Tensor, y: Tensor) -> Tensor:
    return torch.mean((f - y) ** 2)


def _mse_gradient(f: Tensor, y: Tensor) -> Tensor:
    # d/df mean((f - y)^2) = 2 (f - y) / (N O)
    return 2.0 * (f - y) / f.numel()


def _mse_curvature(n: int, n_outputs: int) -> float:
    # The Hessian of mean((f - y)^2) over N O entries is (2 / (N O)) I.
    return 2.0 / (n * n_outputs)


def _ce_value(f: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(f, y)


def _ce_gradient(f: Tensor, y: Tensor) -> Tensor:
    # d/df_i of -sum_c y_ic log softmax(f_i)_c, averaged over N: (sum_c y_ic p_i - y_i) / N.
    p = torch.softmax(f, dim=-1)
    if y.is_floating_point():
        return (p * y.sum(dim=-1, keepdim=True) - y) / f.shape[0]
    return (p - F.one_hot(y, f.shape[-1]).to(p.dtype)) / f.shape[0]


def _ce_curvature(n: int, n_outputs: int) -> float:
    # The Hessian of mean cross-entropy in the logits is block diagonal with blocks
    # (diag(p_i) - p_i p_i^T) / N. For a unit vector u, u^T (diag(p) - p p^T) u is the
    # variance of u under p, at most (max u - min u)^2 / 4 <= (sqrt 2)^2 / 4 = 1/2
    # (Popoviciu), attained at p = (1/2, 1/2, 0, ...), u = (1, -1, 0, ...)/sqrt 2.
    # With probability targets the blocks are scaled by sum_c y_ic = 1.
    return 1.0 / (2.0 * n)


def _check_mse_targets(name: str, y: Tensor, f: Tensor) -> Tensor:
    if y.shape != f.shape:
        raise ValueError(
            f"{name} has shape {tuple(y.shape)} but the outputs have shape {tuple(f.shape)}; "
            "nn.MSELoss compares them entry by entry, so they must match (reshape the "
            "targets to (N, O))"
        )
    return y.to(f.dtype)


def _check_ce_targets(name: str, y: Tensor, f: Tensor) -> Tensor:
    n_classes = f.shape[-1]
    if y.is_floating_point():
        if y.shape != f.shape:
            raise ValueError(
                f"{name} holds class probabilities of shape {tuple(y.shape)} but the logits "
                f"have shape {tuple(f.shape)}; cross_entropy needs integer labels (N,) or "
                "probabilities (N, C)"
            )
        return y.to(f.dtype)
    if y.dtype == torch.bool or y.ndim != 1:
        raise ValueError(
            f"{name} for cross_entropy must be integer class labels of shape (N,) or class "
            f"probabilities (N, C); got dtype {y.dtype} and shape {tuple(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"{name} holds class labels in [{int(y.min())}, {int(y.max())}] but the outputs "
            f"have {n_classes} classes (labels must lie in [0, {n_classes - 1}])"
        )
    return y.long()


def _check_any_targets(name: str, y: Tensor, f: Tensor) -> Tensor:
    return y.to(f.dtype) if y.is_floating_point() else y


def _resolve_loss(loss: LossArg) -> _Loss:
    if callable(loss):
        name = getattr(loss, "__name__", type(loss).__name__)
        return _Loss(name, loss, torch.func.grad(loss), None, _check_any_targets)
    if loss == "mse":
        return _Loss("mse", _mse_value, _mse_gradient, _mse_curvature, _check_mse_targets)
    if loss == "cross_entropy":
        return _Loss("cross_entropy", _ce_value, _ce_gradient, _ce_curvature, _check_ce_targets)
    known = ", ".join(repr(k) for k in KNOWN_LOSSES)
    raise ValueError(f"loss must be one of {known} or a callable loss(f, y); got {loss!r}")


def _class_labels(loss: _Loss, y: Tensor) -> Optional[Tensor]:
    """Labels to score accuracy against, when the targets are classes; else ``None``."""
    if not y.is_floating_point() and y.ndim == 1 and y.dtype != torch.bool:
        return y
    if loss.name == "cross_entropy" and y.ndim == 2:
        return y.argmax(dim=-1)
    return None


# --------------------------------------------------------------------------------------
# Kernels as linear operators on (N, O) function-space vectors
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Kernel:
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
    def from_tensor(cls, name: str, k: Tensor, n_outputs: int) -> "_Kernel":
        if k.ndim == 2:
            return cls(name, k / n_outputs, n_outputs, True)
        n1, n2, o, _ = k.shape
        return cls(name, k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o), o, False)

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
def _tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _count(name: str, value: object) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {count}")
    return count


def _same_examples(kernel_name: str, n: int, name: str, value: Tensor) -> None:
    if value.ndim == 0 or value.shape[0] != n:
        got = value.shape[0] if value.ndim else "no example dimension"
        raise ValueError(f"{kernel_name} has {n} examples but {name} has {got}")


def _check_kernel_shape(name: str, k: Tensor) -> None:
    square = k.ndim == 2 and k.shape[0] == k.shape[1]
    square = square or (k.ndim == 4 and k.shape[0] == k.shape[1] and k.shape[2] == k.shape[3])
    if not square:
        raise ValueError(
            f"{name} must be a full kernel (N, N, O, O) or a trace kernel (N, N); "
            f"got shape {tuple(k.shape)}"
        )


def _check_outputs(name: str, f: Tensor, kernel_name: str, k: Tensor) -> None:
    if f.ndim != 2:
        raise ValueError(f"{name} must have shape (N, O), got {tuple(f.shape)}")
    _same_examples(kernel_name, k.shape[0], name, f)
    if k.ndim == 4 and k.shape[-1] != f.shape[1]:
        raise ValueError(
            f"{name} has {f.shape[1]} outputs per example but {kernel_name} has "
            f"{k.shape[-1]} (shape {tuple(k.shape)})"
        )


def _check_finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _time_points(times: Union[float, Sequence[float], Tensor]) -> List[float]:
    values = times.tolist() if isinstance(times, Tensor) else times
    values = [values] if isinstance(values, numbers.Real) else list(values)
    for t in values:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"times must be non-negative finite numbers, got {t!r}")
    if not values:
        raise ValueError("times must contain at least one time")
    return sorted(set(float(t) for t in values))


def _record_steps(steps: int, record_steps: Optional[Iterable[int]]) -> List[int]:
    if record_steps is None:
        return list(range(steps + 1))
    records = sorted(set(_count("record_steps entries", s) for s in record_steps))
    if not records:
        raise ValueError("record_steps must contain at least one step")
    if records[-1] > steps:
        raise ValueError(f"record_steps must lie in [0, steps={steps}]; got {records[-1]}")
    return records


# --------------------------------------------------------------------------------------
# The problem: validated kernels, outputs and targets
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Problem:
    kernel: _Kernel
    f0: Tensor
    y: Tensor
    loss: _Loss
    test_kernel: Optional[_Kernel] = None
    f0_test: Optional[Tensor] = None
    y_test: Optional[Tensor] = None

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
            labels = _class_labels(self.loss, y)
            if labels is None:
                return losses, None
            correct = outputs.argmax(dim=-1) == labels
            return losses, correct.to(outputs.dtype).mean(dim=-1)


def _prepare(
    k_train_train: Tensor,
    y_train: Tensor,
    f0_train: Optional[Tensor],
    loss: _Loss,
    k_test_train: Optional[Tensor],
    f0_test: Optional[Tensor],
    y_test: Optional[Tensor],
    zero_default: bool = False,
) -> _Problem:
    """Checks shapes and the training kernel, and casts everything to one dtype.

    With ``zero_default``, a missing ``f0_train`` means zero outputs, and then so does a
    missing ``f0_test``.
    """
    k = _tensor("k_train_train", k_train_train)
    _check_kernel_shape("k_train_train", k)
    y = _tensor("y_train", y_train)
    _same_examples("k_train_train", k.shape[0], "y_train", y)
    if f0_train is None:
        if not zero_default:
            raise TypeError("f0_train is required: the (N, O) outputs at initialisation")
        f0_train = _zero_outputs(k, y)
        if k_test_train is not None and f0_test is None:
            kx = _tensor("k_test_train", k_test_train)
            f0_test = f0_train.new_zeros(kx.shape[0] if kx.ndim else 0, f0_train.shape[1])
    f0 = _tensor("f0_train", f0_train)
    _check_outputs("f0_train", f0, "k_train_train", k)
    dtype = torch.promote_types(k.dtype, f0.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"k_train_train and f0_train must be floating point, got {dtype}")
    f0 = f0.to(dtype)
    y = loss.check_targets("y_train", y, f0)
    _check_finite("k_train_train", k)
    _check_finite("f0_train", f0)
    kernel = _Kernel.from_tensor("k_train_train", k.to(dtype), f0.shape[1])
    kernel.check_symmetric()
    kernel = _Kernel(kernel.name, (kernel.matrix + kernel.matrix.T) / 2, kernel.n_outputs,
                     kernel.isotropic)
    test_kernel, f0_test, y_test = _prepare_test(k, f0, loss, k_test_train, f0_test, y_test)
    return _Problem(kernel, f0, y, loss, test_kernel, f0_test, y_test)


def _zero_outputs(k: Tensor, y: Tensor) -> Tensor:
    if k.ndim == 4:
        return k.new_zeros(k.shape[0], k.shape[-1])
    if y.ndim != 2:
        raise ValueError(
            f"with a trace kernel and no f0_train, y_train must have shape (N, O) to give the "
            f"number of outputs; got {tuple(y.shape)}"
        )
    return k.new_zeros(y.shape)


def _prepare_test(
    k: Tensor,
    f0: Tensor,
    loss: _Loss,
    k_test_train: Optional[Tensor],
    f0_test: Optional[Tensor],
    y_test: Optional[Tensor],
) -> Tuple[Optional[_Kernel], Optional[Tensor], Optional[Tensor]]:
    if k_test_train is None:
        for name, value in (("f0_test", f0_test), ("y_test", y_test)):
            if value is not None:
                raise ValueError(f"{name} was given without k_test_train")
        return None, None, None
    kx = _tensor("k_test_train", k_test_train)
    if kx.ndim != k.ndim:
        kinds = {2: "a trace kernel (M, N)", 4: "a full kernel (M, N, O, O)"}
        raise ValueError(
            f"k_test_train is {kinds.get(kx.ndim, f'of shape {tuple(kx.shape)}')} but "
            f"k_train_train is {kinds[k.ndim]}; pass both in the same mode"
        )
    if kx.shape[1] != k.shape[0]:
        raise ValueError(
            f"k_test_train has {kx.shape[1]} training examples (dim 1) but k_train_train "
            f"has {k.shape[0]}"
        )
    if kx.ndim == 4 and kx.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"k_test_train has output dimensions {tuple(kx.shape[2:])} but k_train_train "
            f"has {tuple(k.shape[2:])}"
        )
    if f0_test is None:
        raise ValueError(
            "k_test_train was given without f0_test: pass the model's outputs on the test "
            "inputs at initialisation, shape (M, O)"
        )
    f0_test = _tensor("f0_test", f0_test)
    _check_outputs("f0_test", f0_test, "k_test_train", kx)
    if f0_test.shape[1] != f0.shape[1]:
        raise ValueError(
            f"f0_test has {f0_test.shape[1]} outputs per example but f0_train has {f0.shape[1]}"
        )
    f0_test = f0_test.to(f0.dtype)
    _check_finite("k_test_train", kx)
    _check_finite("f0_test", f0_test)
    if y_test is not None:
        y_test = _tensor("y_test", y_test)
        _same_examples("k_test_train", kx.shape[0], "y_test", y_test)
        y_test = loss.check_targets("y_test", y_test, f0_test)
    return _Kernel.from_tensor("k_test_train", kx.to(f0.dtype), f0.shape[1]), f0_test, y_test


def _jtheta0(name: str, value: Optional[Tensor], like: Tensor) -> Tensor:
    if value is None:
        raise ValueError(
            f"weight_decay > 0 needs {name}: the values J(x)·θ0, shape {tuple(like.shape)}, "
            "of the Jacobian at initialisation applied to the initial parameters (one jvp "
            "with tangent θ0; LinearizedModel.jacobian_theta0(x) computes it)"
        )
    value = _tensor(name, value)
    if value.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but the outputs have shape {tuple(like.shape)}"
        )
    _check_finite(name, value)
    return value.to(like.dtype)


# --------------------------------------------------------------------------------------
# Scalar series, written to stay accurate for small eigenvalues
# --------------------------------------------------------------------------------------
def _geometric_sum(x: Tensor, t: int) -> Tensor:
    """``sum_{s<t} (1 - x)^s = (1 - (1 - x)^t) / x``, equal to ``t`` at ``x = 0``.

    For ``|x| < 1/2`` it is ``-expm1(t log1p(-x)) / x``, free of the cancellation in
    ``1 - (1 - x)^t``; the limit ``t`` is taken exactly where ``x == 0``.
    """
    small = x.abs() < 0.5
    x_small = torch.where(small & (x != 0), x, torch.full_like(x, 0.5))
    x_large = torch.where(small, torch.ones_like(x), x)
    near = -torch.expm1(t * torch.log1p(-x_small)) / x_small
    far = (1 - (1 - x_large) ** t) / x_large
    return torch.where(small, torch.where(x == 0, torch.full_like(x, float(t)), near), far)


def _phi(z: Tensor) -> Tensor:
    """``(1 - exp(-z)) / z``, equal to 1 at ``z = 0``: ``int_0^1 exp(-z s) ds``."""
    safe = torch.where(z == 0, torch.ones_like(z), z)
    return torch.where(z == 0, torch.ones_like(z), -torch.expm1(-safe) / safe)


# --------------------------------------------------------------------------------------
# Gradient descent
# --------------------------------------------------------------------------------------
def gd(
    k_train_train: Tensor,
    y_train: Tensor,
    f0_train: Tensor,
    *,
    lr: float,
    steps: int,
    loss: LossArg = "mse",
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    jtheta0: Optional[Tensor] = None,
    k_test_train: Optional[Tensor] = None,
    f0_test: Optional[Tensor] = None,
    y_test: Optional[Tensor] = None,
    jtheta0_test: Optional[Tensor] = None,
    record_steps: Optional[Iterable[int]] = None,
) -> Prediction:
    r"""Full-batch ``torch.optim.SGD`` on the linearised network, computed in function space.

    The result is what training :func:`ntk_torch.linearize` of the network —
    :math:`f_{lin}(x; \theta) = f_0(x) + J(x)(\theta - \theta_0)` — with
    ``torch.optim.SGD(params, lr, momentum, nesterov=nesterov, weight_decay=weight_decay)``
    on the whole training set gives, up to rounding (Lee et al. 2019, sec. 2.2).

    Args:
        k_train_train: ``(N, N, O, O)`` full or ``(N, N)`` trace kernel at initialisation,
            symmetric positive semi-definite.
        y_train: targets: ``(N, O)`` for ``"mse"``; labels ``(N,)`` or probabilities
            ``(N, C)`` for ``"cross_entropy"``; anything with ``N`` rows for a callable.
        f0_train: ``(N, O)`` outputs at initialisation.
        lr, momentum, nesterov, weight_decay: as in :class:`torch.optim.SGD`.
        steps: number of optimizer steps; steps ``0..steps`` are recorded unless
            ``record_steps`` (a subset of ``[0, steps]``) says otherwise — only recorded
            outputs are kept in memory.
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``loss(f, y) -> scalar``.
        jtheta0, jtheta0_test: ``(N, O)`` / ``(M, O)`` values of :math:`J(x)\theta_0` on the
            training / test inputs, required when ``weight_decay > 0``.
        k_test_train: ``(M, N, O, O)`` or ``(M, N)`` kernel between test and training
            inputs, in the same mode as ``k_train_train``; ``f0_test`` ``(M, O)`` the test
            outputs at initialisation, ``y_test`` optional test targets (for test losses).

    Returns:
        A :class:`Prediction` with ``method="closed_form"`` (MSE, no momentum, no weight
        decay) or ``"iteration"``.

    **Closed form** (``"mse"``, ``momentum == 0``, ``weight_decay == 0``). With
    :math:`\nabla_f L = 2 (f - y) / (N O)` and :math:`\epsilon = 2\,lr / (N O)`,
    :math:`f_{t+1} - y = (I - \epsilon K)(f_t - y)`, so with one eigendecomposition
    :math:`K = V \Lambda V^\top`

    .. math::  f_t = y + V (1 - \epsilon\Lambda)^t V^\top (f_0 - y), \qquad
               f^{test}_t = f^{test}_0 - K_{test,train} V\, h_t(\Lambda)\, V^\top (f_0 - y),

    :math:`h_t(\lambda) = \epsilon \sum_{s<t} (1 - \epsilon\lambda)^s
    = (1 - (1 - \epsilon\lambda)^t)/\lambda`, summed without dividing by :math:`\lambda`
    (:math:`\to \epsilon t` as :math:`\lambda \to 0`), so a singular kernel needs no care.

    **Iteration** (any other case). Let :math:`\delta_t = \theta_t - \theta_0` and
    :math:`v_t = \nabla_f L(f_t)`. SGD's gradient is :math:`g_t = J^\top v_t + wd\,\theta_t`.
    Every vector SGD forms — :math:`\delta_t`, :math:`g_t`, the momentum buffer
    :math:`b_t` and the update — lies in :math:`\{J^\top a + c\,\theta_0\}`: this holds for
    :math:`\delta_0 = 0`, is kept by linear combinations, and if
    :math:`\delta_t = J^\top a_t + c_t \theta_0` then

    .. math::  g_t = J^\top (v_t + wd\, a_t) + wd\,(1 + c_t)\, \theta_0.

    Each vector is therefore tracked as its coefficient pair :math:`(a, c)`, with
    :math:`a` of shape ``(N, O)``, updated by SGD's own rules (dampening 0):

    * gradient :math:`(g^a, g^c) = (v_t + wd\, a_t,\; wd (1 + c_t))`;
    * buffer :math:`b_1 = g_1`, :math:`b_t = \mu b_{t-1} + g_t`;
    * update :math:`u_t = g_t + \mu b_t` (Nesterov), :math:`b_t` (momentum) or :math:`g_t`;
    * :math:`(a, c) \leftarrow (a, c) - lr\, u_t`.

    Outputs follow from :math:`J J^\top = K` and :math:`J\theta_0 = ` ``jtheta0``:

    .. math::  f_t = f_0 + K a_t + c_t\, J\theta_0, \qquad
               f^{test}_t = f^{test}_0 + K_{test,train}\, a_t + c_t\, J_{test}\theta_0.

    Without weight decay :math:`c_t = 0` and ``jtheta0`` is not needed. Each step costs one
    product with the ``(N O) x (N O)`` kernel; test outputs are formed only at recorded
    steps.

    Note:
        The kernel must be over exactly the parameters the optimizer trains, all with the
        same ``lr``/``momentum``/``weight_decay`` (one parameter group), and ``f0``/kernel
        must come from the model in eval mode (BatchNorm on running statistics, no
        Dropout), as :func:`ntk_torch.linearize` does.
    """
    loss_ = _resolve_loss(loss)
    lr = _non_negative("lr", lr)
    steps = _count("steps", steps)
    momentum = _non_negative("momentum", momentum)
    weight_decay = _non_negative("weight_decay", weight_decay)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True requires momentum > 0 (as in torch.optim.SGD)")
    records = _record_steps(steps, record_steps)
    problem = _prepare(k_train_train, y_train, f0_train, loss_, k_test_train, f0_test, y_test)
    steps_tensor = torch.tensor(records, dtype=torch.long)
    if loss == "mse" and momentum == 0 and weight_decay == 0:
        train, test = _gd_mse_closed_form(problem, lr, records)
        return problem.prediction(steps_tensor, train, test, "closed_form")
    problem.kernel.check_psd()
    jt = jtt = None
    if weight_decay > 0:
        jt = _jtheta0("jtheta0", jtheta0, problem.f0)
        if problem.test_kernel is not None:
            jtt = _jtheta0("jtheta0_test", jtheta0_test, problem.f0_test)
    train, test = _gd_iterate(problem, lr, momentum, nesterov, weight_decay, jt, jtt, records)
    return problem.prediction(steps_tensor, train, test, "iteration")


def _gd_mse_closed_form(
    problem: _Problem, lr: float, records: Sequence[int]
) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
    kernel = problem.kernel
    eigenvalues, eigenvectors = kernel.eigh
    epsilon = lr * _mse_curvature(*problem.f0.shape)
    x = (epsilon * eigenvalues)[:, None]
    residual0 = eigenvectors.T @ kernel.vec(problem.f0 - problem.y)
    train = [problem.y + kernel.unvec(eigenvectors @ ((1 - x) ** t * residual0)) for t in records]
    if problem.test_kernel is None:
        return train, None
    test_in_eigenbasis = problem.test_kernel.matrix @ eigenvectors
    test = [
        problem.f0_test
        - kernel.unvec(test_in_eigenbasis @ (epsilon * _geometric_sum(x, t) * residual0))
        for t in records
    ]
    return train, test


def _outputs(kernel: _Kernel, f0: Tensor, a: Tensor, c: float, jtheta0: Optional[Tensor]) -> Tensor:
    """``f0 + K a + c J θ0``: the outputs at ``θ0 + J^T a + c θ0`` (see :func:`gd`)."""
    return f0 + kernel @ a if jtheta0 is None else f0 + kernel @ a + c * jtheta0


def _gd_iterate(
    problem: _Problem,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    jtheta0: Optional[Tensor],
    jtheta0_test: Optional[Tensor],
    records: Sequence[int],
) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
    """SGD in coefficient space; see :func:`gd` for the derivation."""
    kernel, test_kernel = problem.kernel, problem.test_kernel
    a = torch.zeros_like(problem.f0)
    c = 0.0
    buffer: Optional[Tuple[Tensor, float]] = None
    pending = set(records)
    train: List[Tensor] = []
    test: Optional[List[Tensor]] = [] if test_kernel is not None else None

    for step in range(records[-1] + 1):
        f = _outputs(kernel, problem.f0, a, c, jtheta0)
        if step in pending:
            train.append(f)
            if test is not None:
                test.append(_outputs(test_kernel, problem.f0_test, a, c, jtheta0_test))
        if step == records[-1]:
            break
        grad_a = problem.loss.gradient(f, problem.y) + weight_decay * a
        grad_c = weight_decay * (1.0 + c)
        update_a, update_c = grad_a, grad_c
        if momentum:
            if buffer is None:
                buffer = (grad_a, grad_c)
            else:
                buffer = (momentum * buffer[0] + grad_a, momentum * buffer[1] + grad_c)
            if nesterov:
                update_a, update_c = grad_a + momentum * buffer[0], grad_c + momentum * buffer[1]
            else:
                update_a, update_c = buffer
        a = a - lr * update_a
        c = c - lr * update_c
    return train, test


# --------------------------------------------------------------------------------------
# Gradient flow
# --------------------------------------------------------------------------------------
def gradient_flow(
    k_train_train: Tensor,
    y_train: Tensor,
    f0_train: Tensor,
    *,
    lr: float,
    times: Union[float, Sequence[float], Tensor],
    loss: LossArg = "mse",
    k_test_train: Optional[Tensor] = None,
    f0_test: Optional[Tensor] = None,
    y_test: Optional[Tensor] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> Prediction:
    r"""Continuous-time limit of :func:`gd`: :math:`df/dt = -lr\, K \nabla_f L(f)`.

    Time is measured in steps: the flow at time ``t`` with rate ``lr`` is the limit of
    ``gd(..., lr=lr * t / n, steps=n)`` as ``n -> inf`` (it depends on ``lr * t`` only).
    Test outputs follow :math:`df^{test}/dt = -lr\, K_{test,train} \nabla_f L(f)`.

    **MSE** (``method="closed_form"``): with :math:`\epsilon = 2\,lr/(N O)` and
    :math:`K = V\Lambda V^\top` (Lee et al. 2019, eqs. 9-10),

    .. math::  f_t = y + V e^{-\epsilon\Lambda t} V^\top (f_0 - y), \qquad
               f^{test}_t = f^{test}_0 - K_{test,train} V\, \epsilon t\,
               \varphi(\epsilon\Lambda t)\, V^\top (f_0 - y),

    :math:`\varphi(z) = (1 - e^{-z})/z` (:math:`\varphi(0) = 1`), evaluated with ``expm1`` so
    small and zero eigenvalues are exact.

    **Other losses** (``method="dopri5"``): writing :math:`f_t = f_0 + K a_t`, the
    coefficients obey :math:`da/dt = -lr\, \nabla_f L(f_0 + K a)` and test outputs are
    :math:`f^{test}_0 + K_{test,train} a_t`. This ODE is integrated with the Dormand-Prince
    5(4) embedded Runge-Kutta pair with adaptive steps (Dormand & Prince 1980; Hairer,
    Nørsett, Wanner, *Solving ODEs I*, II.5), landing exactly on each requested time. The
    local error is controlled in function space, ``|K err_a| <= atol + rtol |f|`` (RMS
    over entries); defaults ``rtol`` 1e-9 (float64) / 1e-5 (float32) and
    ``atol = rtol * max(1, max |f0|)``.

    Args:
        times: one time or a sequence of non-negative times to record (sorted, unique).
        Other arguments as in :func:`gd`.
    """
    loss_ = _resolve_loss(loss)
    lr = _non_negative("lr", lr)
    time_points = _time_points(times)
    problem = _prepare(k_train_train, y_train, f0_train, loss_, k_test_train, f0_test, y_test)
    steps = torch.tensor(time_points, dtype=problem.f0.dtype)
    if loss == "mse":
        train, test = _flow_mse_closed_form(problem, lr, time_points)
        return problem.prediction(steps, train, test, "closed_form")
    problem.kernel.check_psd()
    if rtol is None:
        rtol = 1e-9 if problem.f0.dtype == torch.float64 else 1e-5
    rtol = _non_negative("rtol", rtol)
    if atol is None:
        atol = rtol * max(1.0, float(problem.f0.abs().max()) if problem.f0.numel() else 1.0)
    atol = _non_negative("atol", atol)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    kernel = problem.kernel

    def rhs(a: Tensor) -> Tensor:
        return -lr * problem.loss.gradient(problem.f0 + kernel @ a, problem.y)

    def error_norm(a_old: Tensor, a_new: Tensor, error: Tensor) -> float:
        scale = atol + rtol * torch.maximum((kernel @ a_old + problem.f0).abs(),
                                            (kernel @ a_new + problem.f0).abs())
        return float(torch.sqrt(torch.mean(((kernel @ error) / scale) ** 2)))

    states = _dopri5(rhs, torch.zeros_like(problem.f0), time_points, error_norm)
    train = [problem.f0 + kernel @ a for a in states]
    test = None
    if problem.test_kernel is not None:
        test = [problem.f0_test + problem.test_kernel @ a for a in states]
    return problem.prediction(steps, train, test, "dopri5")


def _flow_mse_closed_form(
    problem: _Problem, lr: float, times: Sequence[float]
) -> Tuple[List[Tensor], Optional[List[Tensor]]]:
    kernel = problem.kernel
    eigenvalues, eigenvectors = kernel.eigh
    epsilon = lr * _mse_curvature(*problem.f0.shape)
    rate = (epsilon * eigenvalues)[:, None]
    residual0 = eigenvectors.T @ kernel.vec(problem.f0 - problem.y)
    train = [problem.y + kernel.unvec(eigenvectors @ (torch.exp(-rate * t) * residual0))
             for t in times]
    if problem.test_kernel is None:
        return train, None
    test_in_eigenbasis = problem.test_kernel.matrix @ eigenvectors
    test = [
        problem.f0_test
        - kernel.unvec(test_in_eigenbasis @ (epsilon * t * _phi(rate * t) * residual0))
        for t in times
    ]
    return train, test


# Dormand-Prince 5(4): stage coefficients, 5th-order weights (the FSAL row) and the
# difference between the 5th- and 4th-order weights, which estimates the local error.
_DOPRI_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DOPRI_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DOPRI_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _dopri5(
    rhs: Callable[[Tensor], Tensor],
    y0: Tensor,
    times: Sequence[float],
    error_norm: Callable[[Tensor, Tensor, Tensor], float],
    max_steps: int = 1_000_000,
) -> List[Tensor]:
    """Integrates the autonomous ODE ``dy/dt = rhs(y)`` from ``y(0) = y0``; states at ``times``.

    ``error_norm(y_old, y_new, err)`` is the scaled local error; a step is accepted when it
    is at most 1, and the next step is ``h * clip(0.9 err^(-1/5), 0.2, 5)``.
    """
    states: List[Tensor] = []
    t, y, k1 = 0.0, y0, rhs(y0)
    h = max(times[-1], 1.0) / 100
    taken = 0
    for target in times:
        while t < target:
            if taken >= max_steps:
                raise RuntimeError(
                    f"gradient_flow: the ODE solver took {max_steps} steps before time "
                    f"{target}; the problem is too stiff for the tolerances (raise rtol/atol "
                    "or use gd with a small lr)"
                )
            step = min(h, target - t)
            y_new, k7, error = _dopri5_step(rhs, y, k1, step)
            ratio = error_norm(y, y_new, error)
            taken += 1
            factor = 5.0 if ratio == 0 else 0.9 * ratio ** -0.2
            if ratio <= 1.0:
                t = target if step == target - t else t + step
                y, k1 = y_new, k7
                # A step shortened to land on `target` says little about the next one.
                h = max(h, step * min(5.0, max(0.2, factor))) if step < h else \
                    step * min(5.0, max(0.2, factor))
            else:
                h = step * min(1.0, max(0.2, factor))
        states.append(y)
    return states


def _dopri5_step(
    rhs: Callable[[Tensor], Tensor], y: Tensor, k1: Tensor, h: float
) -> Tuple[Tensor, Tensor, Tensor]:
    stages = [k1]
    for row in _DOPRI_A:
        stages.append(rhs(y + h * sum(a * k for a, k in zip(row, stages))))
    y_new = y + h * sum(b * k for b, k in zip(_DOPRI_B, stages))
    stages.append(rhs(y_new))
    error = h * sum(e * k for e, k in zip(_DOPRI_E, stages))
    return y_new, stages[-1], error


# --------------------------------------------------------------------------------------
# Infinite time and stability
# --------------------------------------------------------------------------------------
def kernel_regression(
    k_train_train: Tensor,
    y_train: Tensor,
    f0_train: Optional[Tensor] = None,
    *,
    k_test_train: Optional[Tensor] = None,
    f0_test: Optional[Tensor] = None,
    y_test: Optional[Tensor] = None,
    ridge: float = 0.0,
) -> Prediction:
    r"""The infinite-time limit of MSE gradient descent / flow: kernel (ridge) regression.

    With :math:`K = V \Lambda V^\top` and :math:`r = y - f_0`,

    .. math::  f_\infty = f_0 + K (K + \rho I)^{+} r, \qquad
               f^{test}_\infty = f^{test}_0 + K_{test,train} (K + \rho I)^{+} r

    (Lee et al. 2019, eq. 16 for :math:`\rho = 0`). For ``ridge`` :math:`\rho > 0` the
    inverse is the ordinary one, :math:`V (\Lambda + \rho)^{-1} V^\top`, and the result
    is the minimiser of :math:`\|f_0 + J\delta - y\|^2 + \rho \|\delta\|^2` evaluated at the
    train and test inputs. For :math:`\rho = 0` it is the pseudo-inverse, dropping
    eigenvalues :math:`\le \max(N O \cdot \text{eps}\cdot\lambda_{max}, \text{tolerance})`;
    this is exactly the limit of :func:`gd` and :func:`gradient_flow` with a stable ``lr``,
    since the null-space component of :math:`f_0 - y` never decays: on the training set
    :math:`f_\infty = y` when :math:`r` lies in the range of :math:`K` (e.g. :math:`K`
    invertible), and otherwise :math:`f_\infty - y` is the projection of :math:`f_0 - y`
    on the null space.

    Args:
        f0_train, f0_test: outputs at initialisation; default zeros (classic kernel
            regression, as for a network whose output is centred at initialisation).
        ridge: non-negative ridge :math:`\rho`, in the units of the kernel.
        Other arguments as in :func:`gd` with ``loss="mse"``.

    Returns:
        A :class:`Prediction` with one record at ``steps = [inf]`` and
        ``method="kernel_regression"``.
    """
    ridge = _non_negative("ridge", ridge)
    problem = _prepare(k_train_train, y_train, f0_train, _resolve_loss("mse"), k_test_train,
                       f0_test, y_test, zero_default=True)
    kernel = problem.kernel
    eigenvalues, eigenvectors = kernel.eigh
    if ridge > 0:
        inverse = 1.0 / (eigenvalues + ridge)
    else:
        eps = torch.finfo(eigenvalues.dtype).eps
        top = float(eigenvalues[-1]) if eigenvalues.numel() else 0.0
        cutoff = max(eigenvalues.numel() * eps * top, kernel.tolerance)
        kept = eigenvalues > cutoff
        safe = torch.where(kept, eigenvalues, torch.ones_like(eigenvalues))
        inverse = torch.where(kept, 1.0 / safe, torch.zeros_like(eigenvalues))
    weights = inverse[:, None] * (eigenvectors.T @ kernel.vec(problem.y - problem.f0))
    train = problem.f0 + kernel.unvec(eigenvectors @ (eigenvalues[:, None] * weights))
    test = None
    if problem.test_kernel is not None:
        test_change = problem.test_kernel.matrix @ (eigenvectors @ weights)
        test = [problem.f0_test + kernel.unvec(test_change)]
    steps = torch.tensor([math.inf], dtype=problem.f0.dtype)
    return problem.prediction(steps, [train], test, "kernel_regression")


def max_learning_rate(
    k_train_train: Tensor,
    loss: LossArg = "mse",
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    n_outputs: Optional[int] = None,
) -> float:
    r"""The largest learning rate at which linearised full-batch SGD is stable.

    In parameter space the linearised loss has curvature :math:`J^\top H J + wd\, I`, with
    :math:`H` the Hessian of the loss in :math:`f`; its top eigenvalue is at most
    :math:`\beta = h\,\lambda_{max}(K) + wd` where :math:`h \ge \lambda_{max}(H)`. One
    mode of curvature :math:`\lambda` under SGD with momentum :math:`\mu` evolves by a
    linear recurrence in :math:`z = lr\,\lambda` that is stable (Jury criterion) iff

    * plain / heavy-ball momentum: :math:`0 < z < 2 (1 + \mu)`
      (characteristic polynomial :math:`r^2 - (1 + \mu - z) r + \mu`);
    * Nesterov: :math:`0 < z < 2 (1 + \mu) / (1 + 2\mu)`
      (:math:`r^2 - (1 + \mu - z(1 + \mu)) r + \mu (1 - z)`).

    The returned rate is that factor divided by :math:`\beta`; with ``momentum=0`` and MSE
    it is :math:`N O / \lambda_{max}(K)`. At the rate itself the top mode oscillates
    without growing (roots :math:`-1` and another inside the unit disk).

    The curvature bound :math:`h` per loss:

    * ``"mse"`` (``nn.MSELoss``, mean over :math:`N O` entries): :math:`H = 2/(N O)\, I`,
      so the bound is exact and the rate is sharp.
    * ``"cross_entropy"`` (mean over :math:`N`): :math:`H` is block diagonal with blocks
      :math:`(\mathrm{diag}(p_i) - p_i p_i^\top)/N`, whose eigenvalues are at most
      :math:`1/(2N)`: :math:`u^\top(\mathrm{diag}(p) - pp^\top)u` is the variance of
      :math:`u` under :math:`p`, at most :math:`(\max u - \min u)^2/4 \le 1/2` for a unit
      :math:`u` (attained at :math:`p = (1/2, 1/2, 0, \dots)`). The rate
      :math:`4 N (1 + \mu) / \lambda_{max}(K)` (:math:`\mu = 0`) is therefore a worst-case,
      sufficient bound: for :math:`\mu = 0` it guarantees the loss decreases at every step
      (the descent lemma for the convex, :math:`\beta`-smooth linearised loss); with
      momentum it guarantees local stability wherever the logits are. It is sharp only
      where the softmax puts equal mass on two classes along the kernel's top direction;
      near uniform predictions over :math:`C` classes the curvature is about :math:`1/(NC)`
      and larger rates are still stable.

    Args:
        k_train_train: ``(N, N, O, O)`` full or ``(N, N)`` trace kernel.
        loss: ``"mse"`` or ``"cross_entropy"`` (a callable has no known curvature).
        momentum: SGD momentum, in ``[0, 1)``.
        nesterov, weight_decay: as in :class:`torch.optim.SGD`.
        n_outputs: ``O``; required with a trace kernel, used as ``(K_trace / O) (x) I_O``.

    Returns:
        The critical learning rate (``inf`` for a zero kernel without weight decay).
    """
    loss_ = _resolve_loss(loss)
    if loss_.curvature is None:
        raise ValueError(
            f"max_learning_rate needs the loss's curvature, known for {list(KNOWN_LOSSES)}; "
            f"got the callable {loss_.name!r}"
        )
    momentum = _non_negative("momentum", momentum)
    if momentum >= 1:
        raise ValueError(f"momentum must be in [0, 1) for SGD to be stable, got {momentum}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True requires momentum > 0 (as in torch.optim.SGD)")
    weight_decay = _non_negative("weight_decay", weight_decay)
    k = _tensor("k_train_train", k_train_train)
    _check_kernel_shape("k_train_train", k)
    if k.ndim == 4:
        if n_outputs is not None and n_outputs != k.shape[-1]:
            raise ValueError(f"n_outputs={n_outputs} but k_train_train has {k.shape[-1]} outputs")
        n_outputs = k.shape[-1]
    elif n_outputs is None:
        raise ValueError(
            "k_train_train is a trace kernel (N, N): pass n_outputs (O), which sets the "
            "loss's scale and the isotropic kernel (K_trace / O) (x) I_O"
        )
    n_outputs = _count("n_outputs", n_outputs)
    if not k.is_floating_point():
        raise TypeError(f"k_train_train must be floating point, got {k.dtype}")
    _check_finite("k_train_train", k)
    kernel = _Kernel.from_tensor("k_train_train", k, n_outputs)
    kernel.check_symmetric()
    symmetric = (kernel.matrix + kernel.matrix.T) / 2
    kernel = _Kernel(kernel.name, symmetric, n_outputs, kernel.isotropic)
    top = float(kernel.eigh[0][-1]) if k.shape[0] else 0.0
    curvature = loss_.curvature(k.shape[0], n_outputs) * max(top, 0.0) + weight_decay
    factor = 2 * (1 + momentum) / (1 + 2 * momentum) if nesterov else 2 * (1 + momentum)
    return math.inf if curvature == 0 else factor / curvature
