"""The linearised dynamics as a configured object, and the one-shot functions on top.

:class:`LinearisedDynamics` checks a training kernel, the initial outputs, the targets and
an optional test kernel once, and keeps the kernel's eigendecomposition, so that every
trajectory asked of it -- gradient descent for any ``lr``/``steps``/momentum, gradient
flow, kernel regression, the largest stable learning rate -- reuses it (the tracker's
forecast asks for longer and longer horizons as a run advances). :func:`gd`,
:func:`gradient_flow`, :func:`kernel_regression` and :func:`max_learning_rate` build one and
ask once; their docstrings hold the formulas.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from .._options import check_bool
from ..losses import KNOWN_LOSSES, LossArg, resolve
from .problem import (
    KernelMatrix,
    Prediction,
    Problem,
    check_finite,
    count,
    kernel_layout,
    non_negative,
    prepare,
    record_steps_of,
    tensor_arg,
    time_points,
)
from .solvers import SGDRecurrence, dopri5, flow_mse_closed_form, gd_iterate, gd_mse_closed_form

Times = Union[float, Sequence[float], Tensor]


class LinearisedDynamics:
    r"""Training of the network linearised at :math:`\theta_0`, in function space.

    Args:
        k_train_train: ``(N, N, O, O)`` full or ``(N, N)`` trace kernel at initialisation,
            symmetric positive semi-definite (a trace kernel is used as the isotropic
            approximation ``(K_trace / O) (x) I_O``).
        y_train: targets: ``(N, O)`` for ``"mse"``; labels ``(N,)`` or probabilities
            ``(N, C)`` for ``"cross_entropy"``; anything with ``N`` rows for a callable.
        f0_train: ``(N, O)`` outputs at initialisation; None for zeros.
        loss: ``"mse"``, ``"cross_entropy"``, an ``nn.MSELoss``/``nn.CrossEntropyLoss``, a
            :class:`ntk_torch.losses.Loss` or a callable ``loss(f, y) -> scalar``.
        k_test_train: ``(M, N, O, O)`` or ``(M, N)`` kernel between test and training
            inputs, in the layout of ``k_train_train``; ``f0_test`` ``(M, O)`` the test
            outputs at initialisation (zeros when ``f0_train`` is None), ``y_test``
            optional test targets (for test losses).
        jtheta0, jtheta0_test: ``(N, O)`` / ``(M, O)`` values of :math:`J(x)\theta_0`, which
            weight decay needs (``LinearizedModel.jacobian_theta0``).

    Every method is what its namesake function computes (:func:`gd`,
    :func:`gradient_flow`, :func:`kernel_regression`, :func:`max_learning_rate`); the
    kernel is checked (symmetric, finite) once, its eigendecomposition computed at most
    once.

    Raises:
        ValueError / TypeError: naming the argument at fault.
    """

    def __init__(
        self,
        k_train_train: Tensor,
        y_train: Tensor,
        f0_train: Optional[Tensor] = None,
        *,
        loss: LossArg = "mse",
        k_test_train: Optional[Tensor] = None,
        f0_test: Optional[Tensor] = None,
        y_test: Optional[Tensor] = None,
        jtheta0: Optional[Tensor] = None,
        jtheta0_test: Optional[Tensor] = None,
    ) -> None:
        self.loss = resolve(loss)
        self.problem: Problem = prepare(
            k_train_train, y_train, f0_train, self.loss, k_test_train, f0_test, y_test, jtheta0, jtheta0_test
        )
        self._psd_checked = False

    @property
    def kernel(self) -> KernelMatrix:
        """The training kernel as a matrix on function-space vectors."""
        return self.problem.kernel

    @cached_property
    def _test_in_eigenbasis(self) -> Optional[Tensor]:
        """``K_test,train V``: the test kernel in the training kernel's eigenbasis."""
        test = self.problem.test_kernel
        return None if test is None else test.matrix @ self.kernel.eigh[1]

    def _check_psd(self) -> None:
        if not self._psd_checked:
            self.kernel.check_psd()
            self._psd_checked = True

    def gd(
        self,
        *,
        lr: float,
        steps: int,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        record_steps: Optional[Iterable[int]] = None,
    ) -> Prediction:
        """Full-batch ``torch.optim.SGD`` on the linearised network (see :func:`gd`)."""
        lr = non_negative("lr", lr)
        steps = count("steps", steps)
        momentum = non_negative("momentum", momentum)
        weight_decay = non_negative("weight_decay", weight_decay)
        if check_bool("nesterov", nesterov) and momentum == 0:
            raise ValueError("nesterov=True requires momentum > 0 (as in torch.optim.SGD)")
        records = record_steps_of(steps, record_steps)
        problem = self.problem
        steps_tensor = torch.tensor(records, dtype=torch.long)
        if self.loss.closed_form == "mse" and momentum == 0 and weight_decay == 0:
            train, test = gd_mse_closed_form(problem, lr, records, self._test_in_eigenbasis)
            return problem.prediction(steps_tensor, train, test, "closed_form")
        self._check_psd()
        jt = jtt = None
        if weight_decay > 0:
            jt, jtt = problem.weight_decay_values()
        train, test = gd_iterate(problem, lr, momentum, nesterov, weight_decay, jt, jtt, records)
        return problem.prediction(steps_tensor, train, test, "iteration")

    def gd_trajectory(
        self, *, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
    ) -> "GDTrajectory":
        """The trajectory of :meth:`gd`, one step at a time, in memory that does not grow
        with the number of steps (see :class:`GDTrajectory`)."""
        lr = non_negative("lr", lr)
        momentum = non_negative("momentum", momentum)
        weight_decay = non_negative("weight_decay", weight_decay)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True requires momentum > 0 (as in torch.optim.SGD)")
        if not (self.loss.closed_form == "mse" and momentum == 0 and weight_decay == 0):
            self._check_psd()
        return GDTrajectory(self, lr, momentum, nesterov, weight_decay)

    def gradient_flow(self, *, lr: float, times: Times, rtol: Optional[float] = None,
                      atol: Optional[float] = None) -> Prediction:
        """The continuous-time limit of :meth:`gd` (see :func:`gradient_flow`)."""
        lr = non_negative("lr", lr)
        points = time_points(times)
        problem = self.problem
        steps = torch.tensor(points, dtype=problem.f0.dtype)
        if self.loss.closed_form == "mse":
            train, test = flow_mse_closed_form(problem, lr, points, self._test_in_eigenbasis)
            return problem.prediction(steps, train, test, "closed_form")
        self._check_psd()
        if rtol is None:
            rtol = 1e-9 if problem.f0.dtype == torch.float64 else 1e-5
        rtol = non_negative("rtol", rtol)
        if atol is None:
            atol = rtol * max(1.0, float(problem.f0.abs().max()) if problem.f0.numel() else 1.0)
        atol = non_negative("atol", atol)
        if rtol == 0 and atol == 0:
            raise ValueError("rtol and atol cannot both be 0")
        kernel = problem.kernel

        def rhs(a: Tensor) -> Tensor:
            return -lr * problem.loss.gradient(problem.f0 + kernel @ a, problem.y)

        def error_norm(a_old: Tensor, a_new: Tensor, error: Tensor) -> float:
            scale = atol + rtol * torch.maximum((kernel @ a_old + problem.f0).abs(),
                                                (kernel @ a_new + problem.f0).abs())
            return float(torch.sqrt(torch.mean(((kernel @ error) / scale) ** 2)))

        states = dopri5(rhs, torch.zeros_like(problem.f0), points, error_norm)
        train = [problem.f0 + kernel @ a for a in states]
        test = None
        if problem.test_kernel is not None:
            test = [problem.f0_test + problem.test_kernel @ a for a in states]
        return problem.prediction(steps, train, test, "dopri5")

    def kernel_regression(self, *, ridge: float = 0.0) -> Prediction:
        """The infinite-time limit of MSE training (see :func:`kernel_regression`).

        Raises:
            ValueError: the loss is not ``"mse"`` (kernel regression is the limit of MSE
                training only).
        """
        ridge = non_negative("ridge", ridge)
        if self.loss.closed_form != "mse":
            raise ValueError(
                f"kernel_regression is the long-time limit of MSE training; this problem's loss is {self.loss.name!r}"
            )
        problem = self.problem
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
            test = [problem.f0_test + kernel.unvec(self._test_in_eigenbasis @ weights)]
        steps = torch.tensor([math.inf], dtype=problem.f0.dtype)
        return problem.prediction(steps, [train], test, "kernel_regression")

    def max_learning_rate(self, *, momentum: float = 0.0, nesterov: bool = False,
                          weight_decay: float = 0.0, exact: bool = True) -> float:
        """The largest stable learning rate of linearised full-batch SGD (see
        :func:`max_learning_rate`). With ``exact=False`` and no eigendecomposition computed
        yet, the kernel's top eigenvalue is estimated by power iteration
        (:meth:`~.problem.KernelMatrix.top_eigenvalue`), which costs a few dozen kernel
        products instead of a decomposition and can only overestimate the rate slightly."""
        n, o = self.problem.f0.shape
        return _critical_rate(self.kernel, self.loss, n, o, momentum, nesterov, weight_decay, exact)


class GDTrajectory:
    """Full-batch SGD on the linearised network (what :meth:`LinearisedDynamics.gd`
    computes), asked one step at a time: :meth:`at` gives the prediction at a step.

    For MSE without momentum or weight decay every step is the closed form (one
    eigendecomposition, cached by the dynamics); otherwise the SGD recurrence
    (:class:`~.solvers.SGDRecurrence`) advances to the step asked for, so steps asked in
    increasing order cost ``O(T)`` kernel products in all; an earlier step starts again
    from step 0. Only the current state is kept: memory does not grow with the steps.
    """

    def __init__(self, dynamics: LinearisedDynamics, lr: float, momentum: float, nesterov: bool,
                 weight_decay: float) -> None:
        self.dynamics = dynamics
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        problem = dynamics.problem
        self.closed_form = dynamics.loss.closed_form == "mse" and momentum == 0 and weight_decay == 0
        self._jt = self._jtt = None
        if weight_decay > 0:
            self._jt, self._jtt = problem.weight_decay_values()
        self._recurrence: Optional[SGDRecurrence] = None

    @property
    def method(self) -> str:
        """``"closed_form"`` or ``"iteration"``, as for :meth:`LinearisedDynamics.gd`."""
        return "closed_form" if self.closed_form else "iteration"

    def at(self, step: int) -> Prediction:
        """The prediction at optimizer step ``step``: a :class:`Prediction` with one row."""
        step = count("step", step)
        problem = self.dynamics.problem
        if self.closed_form:
            train, test = gd_mse_closed_form(problem, self.lr, [step], self.dynamics._test_in_eigenbasis)
        else:
            recurrence = self._recurrence
            if recurrence is None or recurrence.step > step:
                recurrence = self._recurrence = SGDRecurrence(
                    problem, self.lr, self.momentum, self.nesterov, self.weight_decay, self._jt
                )
            while recurrence.step < step:
                recurrence.advance()
            test_outputs = recurrence.test(self._jtt)
            train, test = [recurrence.train], None if test_outputs is None else [test_outputs]
        return problem.prediction(torch.tensor([step], dtype=torch.long), train, test, self.method)


def _critical_rate(kernel: KernelMatrix, loss, n: int, o: int, momentum: float, nesterov: bool,
                   weight_decay: float, exact: bool = True) -> float:
    """``factor / (h lambda_max + wd)``; see :func:`max_learning_rate`."""
    if loss.curvature(n, o) is None:
        raise ValueError(
            f"max_learning_rate needs the loss's curvature, known for {list(KNOWN_LOSSES)}; "
            f"got the callable {loss.name!r}"
        )
    momentum = non_negative("momentum", momentum)
    if momentum >= 1:
        raise ValueError(f"momentum must be in [0, 1) for SGD to be stable, got {momentum}")
    if check_bool("nesterov", nesterov) and momentum == 0:
        raise ValueError("nesterov=True requires momentum > 0 (as in torch.optim.SGD)")
    weight_decay = non_negative("weight_decay", weight_decay)
    top = kernel.top_eigenvalue(exact=exact) if n else 0.0
    curvature = loss.curvature(n, o) * max(top, 0.0) + weight_decay
    factor = 2 * (1 + momentum) / (1 + 2 * momentum) if nesterov else 2 * (1 + momentum)
    return math.inf if curvature == 0 else factor / curvature


# --------------------------------------------------------------------------------------
# The one-shot functions
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
        steps: number of optimizer steps.
        record_steps: the steps whose outputs are kept, a subset of ``[0, steps]``; by
            default every step up to :data:`ntk_torch.steps.DENSE_STEPS`, then two per
            doubling of the step count, and ``steps`` itself
            (:func:`ntk_torch.steps.dense_then_log`), so memory does not grow with
            ``steps``. Only recorded outputs are kept.
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
    if f0_train is None:
        raise TypeError("f0_train is required: the (N, O) outputs at initialisation")
    dynamics = LinearisedDynamics(
        k_train_train, y_train, f0_train, loss=loss, k_test_train=k_test_train, f0_test=f0_test,
        y_test=y_test, jtheta0=jtheta0, jtheta0_test=jtheta0_test,
    )
    return dynamics.gd(lr=lr, steps=steps, momentum=momentum, nesterov=nesterov,
                       weight_decay=weight_decay, record_steps=record_steps)


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
    if f0_train is None:
        raise TypeError("f0_train is required: the (N, O) outputs at initialisation")
    dynamics = LinearisedDynamics(
        k_train_train, y_train, f0_train, loss=loss, k_test_train=k_test_train, f0_test=f0_test,
        y_test=y_test,
    )
    return dynamics.gradient_flow(lr=lr, times=times, rtol=rtol, atol=atol)


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
    dynamics = LinearisedDynamics(
        k_train_train, y_train, f0_train, loss="mse", k_test_train=k_test_train, f0_test=f0_test,
        y_test=y_test,
    )
    return dynamics.kernel_regression(ridge=ridge)


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
    loss_ = resolve(loss)
    k = tensor_arg("k_train_train", k_train_train)
    layout = kernel_layout("k_train_train", k)
    outputs = layout.num_outputs(k)
    if outputs is not None:
        if n_outputs is not None and n_outputs != outputs:
            raise ValueError(f"n_outputs={n_outputs} but k_train_train has {outputs} outputs")
        n_outputs = outputs
    elif n_outputs is None:
        raise ValueError(
            "k_train_train is a trace kernel (N, N): pass n_outputs (O), which sets the "
            "loss's scale and the isotropic kernel (K_trace / O) (x) I_O"
        )
    n_outputs = count("n_outputs", n_outputs)
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be at least 1 (the outputs per example), got {n_outputs}")
    if not k.is_floating_point():
        raise TypeError(f"k_train_train must be floating point, got {k.dtype}")
    check_finite("k_train_train", k)
    kernel = KernelMatrix.from_tensor("k_train_train", k, n_outputs).symmetrized()
    return _critical_rate(kernel, loss_, k.shape[0], n_outputs, momentum, nesterov, weight_decay)
