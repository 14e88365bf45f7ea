"""The solvers behind :mod:`ntk_torch.predict`: closed forms, the SGD recurrence, an ODE pair.

Every function takes a checked :class:`~.problem.Problem` (kernels as matrices, outputs,
targets) and returns the train and test outputs at the requested steps or times; the
derivations are in the docstrings of :class:`~.dynamics.LinearisedDynamics`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .problem import KernelMatrix, Problem

Outputs = Tuple[List[Tensor], Optional[List[Tensor]]]


# --------------------------------------------------------------------------------------
# Scalar series, written to stay accurate for small eigenvalues
# --------------------------------------------------------------------------------------
def geometric_sum(x: Tensor, t: int) -> Tensor:
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


def phi(z: Tensor) -> Tensor:
    """``(1 - exp(-z)) / z``, equal to 1 at ``z = 0``: ``int_0^1 exp(-z s) ds``."""
    safe = torch.where(z == 0, torch.ones_like(z), z)
    return torch.where(z == 0, torch.ones_like(z), -torch.expm1(-safe) / safe)


# --------------------------------------------------------------------------------------
# Gradient descent
# --------------------------------------------------------------------------------------
def gd_mse_closed_form(
    problem: Problem, lr: float, records: Sequence[int], test_in_eigenbasis: Optional[Tensor]
) -> Outputs:
    """MSE without momentum or weight decay: ``f_t = y + V (1 - eps Lambda)^t V^T (f_0 - y)``
    with ``eps = 2 lr / (N O)``; ``test_in_eigenbasis`` is ``K_test,train V``."""
    kernel = problem.kernel
    eigenvalues, eigenvectors = kernel.eigh
    epsilon = lr * problem.loss.curvature(*problem.f0.shape)
    x = (epsilon * eigenvalues)[:, None]
    residual0 = eigenvectors.T @ kernel.vec(problem.f0 - problem.y)
    train = [problem.y + kernel.unvec(eigenvectors @ ((1 - x) ** t * residual0)) for t in records]
    if test_in_eigenbasis is None:
        return train, None
    test = [
        problem.f0_test
        - kernel.unvec(test_in_eigenbasis @ (epsilon * geometric_sum(x, t) * residual0))
        for t in records
    ]
    return train, test


def _outputs(kernel: KernelMatrix, f0: Tensor, a: Tensor, c: float, jtheta0: Optional[Tensor]) -> Tensor:
    """``f0 + K a + c J θ0``: the outputs at ``θ0 + J^T a + c θ0``."""
    return f0 + kernel @ a if jtheta0 is None else f0 + kernel @ a + c * jtheta0


class SGDRecurrence:
    """Full-batch SGD on the linearised network in coefficient space, one step at a time
    (see :func:`~.dynamics.gd` for the derivation): the parameters are
    ``theta_0 + J^T a + c theta_0`` and the outputs ``f0 + K a + c J theta_0``.

    ``step`` counts the steps taken; ``train`` holds the training outputs at ``step``
    ``(N, O)``. Memory is that of a few ``(N, O)`` vectors, whatever the number of steps.
    """

    def __init__(self, problem: Problem, lr: float, momentum: float, nesterov: bool, weight_decay: float,
                 jtheta0: Optional[Tensor]) -> None:
        self.problem, self.lr, self.momentum, self.nesterov = problem, lr, momentum, nesterov
        self.weight_decay, self.jtheta0 = weight_decay, jtheta0
        self.a = torch.zeros_like(problem.f0)
        self.c = 0.0
        self.buffer: Optional[Tuple[Tensor, float]] = None
        self.step = 0
        self.train = _outputs(problem.kernel, problem.f0, self.a, self.c, jtheta0)

    def test(self, jtheta0_test: Optional[Tensor]) -> Optional[Tensor]:
        """The test outputs at ``step`` ``(M, O)``, or None without a test kernel."""
        problem = self.problem
        if problem.test_kernel is None:
            return None
        return _outputs(problem.test_kernel, problem.f0_test, self.a, self.c, jtheta0_test)

    def advance(self) -> None:
        """One SGD step: ``(a, c) <- (a, c) - lr u`` (dampening 0)."""
        momentum, weight_decay = self.momentum, self.weight_decay
        grad_a = self.problem.loss.gradient(self.train, self.problem.y) + weight_decay * self.a
        grad_c = weight_decay * (1.0 + self.c)
        update_a, update_c = grad_a, grad_c
        if momentum:
            if self.buffer is None:
                self.buffer = (grad_a, grad_c)
            else:
                self.buffer = (momentum * self.buffer[0] + grad_a, momentum * self.buffer[1] + grad_c)
            if self.nesterov:
                update_a, update_c = grad_a + momentum * self.buffer[0], grad_c + momentum * self.buffer[1]
            else:
                update_a, update_c = self.buffer
        self.a = self.a - self.lr * update_a
        self.c = self.c - self.lr * update_c
        self.step += 1
        self.train = _outputs(self.problem.kernel, self.problem.f0, self.a, self.c, self.jtheta0)


def gd_iterate(
    problem: Problem,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    jtheta0: Optional[Tensor],
    jtheta0_test: Optional[Tensor],
    records: Sequence[int],
) -> Outputs:
    """SGD in coefficient space (:class:`SGDRecurrence`), the outputs kept at ``records``."""
    recurrence = SGDRecurrence(problem, lr, momentum, nesterov, weight_decay, jtheta0)
    pending = set(records)
    train: List[Tensor] = []
    test: Optional[List[Tensor]] = [] if problem.test_kernel is not None else None
    while True:
        if recurrence.step in pending:
            train.append(recurrence.train)
            if test is not None:
                test.append(recurrence.test(jtheta0_test))
        if recurrence.step == records[-1]:
            return train, test
        recurrence.advance()


# --------------------------------------------------------------------------------------
# Gradient flow
# --------------------------------------------------------------------------------------
def flow_mse_closed_form(
    problem: Problem, lr: float, times: Sequence[float], test_in_eigenbasis: Optional[Tensor]
) -> Outputs:
    """MSE gradient flow: ``f_t = y + V exp(-eps Lambda t) V^T (f_0 - y)``."""
    kernel = problem.kernel
    eigenvalues, eigenvectors = kernel.eigh
    epsilon = lr * problem.loss.curvature(*problem.f0.shape)
    rate = (epsilon * eigenvalues)[:, None]
    residual0 = eigenvectors.T @ kernel.vec(problem.f0 - problem.y)
    train = [problem.y + kernel.unvec(eigenvectors @ (torch.exp(-rate * t) * residual0))
             for t in times]
    if test_in_eigenbasis is None:
        return train, None
    test = [
        problem.f0_test
        - kernel.unvec(test_in_eigenbasis @ (epsilon * t * phi(rate * t) * residual0))
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


def dopri5(
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
