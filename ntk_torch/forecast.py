"""The kernel forecast: the linearised model's training curve from the kernel at step 0.

At step 0 the tracker (or ``ntk-torch predict``) builds a :class:`LinearisedForecast` over
the training data (all of it up to ``max_points`` examples, else a seeded subset) from the
optimizer's SGD hyperparameters (:func:`sgd_settings`); at each measurement it asks for the
predicted train and test loss (and accuracy) at that step (:meth:`LinearisedForecast.at`),
computed in function space by one :class:`ntk_torch.predict.LinearisedDynamics` — exactly
what full-batch ``torch.optim.SGD`` on the linearised network gives (Lee et al. 2019).

This is the cheap, exact path for one case: full-batch SGD with one set of
hyperparameters. Everything else (Adam, schedulers, clipping, minibatches, per-group
hyperparameters, dampening) is the linearised twin's (:mod:`ntk_torch.twin`);
:func:`sgd_settings` names what this path cannot model, and
:mod:`ntk_torch.forecasting` chooses between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import jvp

from . import records
from .functional import FunctionalModel, evaluation_context
from .kernel import NTK
from .layout import FULL, TRACE
from .losses import CLASSIFICATION, REGRESSION, Loss
from .predict import LinearisedDynamics
from .probe import LabelledSet, call_model
from .steps import dense_then_log_steps

MAX_FULL_ENTRIES = 2**24
"""The prediction kernel is ``full`` (exact) while ``(N O)^2`` stays under this many
entries (128 MiB in float64); above, it is ``trace``, used as the isotropic approximation."""


@dataclass(frozen=True)
class SGDSettings:
    """The hyperparameters of a one-group ``torch.optim.SGD``."""

    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float


def sgd_settings(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> Tuple[Optional[SGDSettings], List[str], List[str]]:
    """The SGD settings the forecast models, the names of the model's parameters the
    optimizer trains, and what cannot be modelled (empty when everything can)."""
    problems: List[str] = []
    if not isinstance(optimizer, torch.optim.SGD):
        problems.append(f"the optimizer is {type(optimizer).__name__}, and only torch.optim.SGD is modelled")
        return None, [], problems
    groups = optimizer.param_groups
    keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
    values = {key: {_plain(group.get(key)) for group in groups} for key in keys}
    varying = [key for key in keys if len(values[key]) > 1]
    if varying:
        problems.append(f"parameter groups have different {', '.join(varying)} (per-group hyperparameters)")
    first = groups[0]
    if first.get("dampening", 0):
        problems.append(f"dampening={first['dampening']} (only dampening=0 is modelled)")
    if first.get("maximize", False):
        problems.append("maximize=True")
    owned = {id(p): name for name, p in model.named_parameters()}
    trained = [p for group in groups for p in group["params"] if p.requires_grad]
    foreign = [p for p in trained if id(p) not in owned]
    if foreign:
        problems.append(f"the optimizer trains {len(foreign)} tensors that are not parameters of the model")
    if problems:
        return None, [], problems
    names = sorted({owned[id(p)] for p in trained}, key=list(owned.values()).index)
    settings = SGDSettings(
        lr=float(_plain(first["lr"])),
        momentum=float(first.get("momentum", 0.0)),
        nesterov=bool(first.get("nesterov", False)),
        weight_decay=float(first.get("weight_decay", 0.0)),
    )
    return settings, names, []


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


class LinearisedForecast:
    """Predicted losses of the linearised network at any step, from the kernel at step 0.

    Args:
        model: the module (unwrapped), at its initial parameters.
        points: the training examples the forecast covers (``N`` of them).
        test: optional test examples.
        loss: the training loss.
        settings: the SGD hyperparameters.
        param_names: the parameters the optimizer trains (the kernel's parameters).
        output_fn, call_kwargs: as for ``empirical_ntk``.
        approximate_points: whether ``points`` is a subset of the training data.

    The kernel over ``points`` is ``full`` (exact) while ``(N O)^2`` stays under
    :data:`MAX_FULL_ENTRIES`, else ``trace`` (the isotropic approximation). The trajectory
    is one :class:`ntk_torch.predict.GDTrajectory` (one eigendecomposition for the closed
    form; the SGD recurrence otherwise, advanced as later steps are asked for, so a run of
    ``T`` steps costs ``O(T)`` kernel products in all). Only the current state is kept,
    and, for figures, the predicted losses (plain floats) at every step up to
    :data:`ntk_torch.steps.DENSE_STEPS` and on the log schedule beyond (:meth:`dense`):
    memory does not grow with the number of steps.
    """

    kind = "kernel"

    def __init__(
        self,
        *,
        model: nn.Module,
        points: LabelledSet,
        test: Optional[LabelledSet],
        loss: Loss,
        settings: SGDSettings,
        param_names: Sequence[str],
        output_fn: Optional[Callable[[Any], torch.Tensor]],
        approximate_points: bool,
        call_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.settings = settings
        self.points = points
        self.test = test
        self.loss = loss
        self.output_fn = output_fn
        self.call_kwargs = call_kwargs
        device = next(model.parameters()).device
        with torch.no_grad(), evaluation_context(model, device):
            f0 = call_model(model, points.x, output_fn, call_kwargs)
            f0_test = call_model(model, test.x, output_fn, call_kwargs) if test is not None else None
        if loss.kind == CLASSIFICATION and f0.dim() != 2:
            raise ValueError(
                f"predictions with {loss.name!r} need outputs (N, C); the model's are {tuple(f0.shape)}"
            )
        self.classes = loss.class_labels(points.y, f0) is not None
        n, num_outputs = len(points), f0[0].numel()
        layout = FULL if (n * num_outputs) ** 2 <= MAX_FULL_ENTRIES else TRACE
        self.kernel_mode = layout.name
        kernel = NTK(
            model, mode=layout.name, params=list(param_names), output_fn=output_fn, dtype=torch.float64,
            call_kwargs=call_kwargs,
        )
        jtheta0 = jtheta0_test = None
        if settings.weight_decay > 0:
            fmodel = FunctionalModel(
                model, params=list(param_names), output_fn=output_fn, dtype=torch.float64, call_kwargs=call_kwargs
            )
            jtheta0, jtheta0_test = _jtheta0_of(fmodel, points, test, device)
        self.dynamics = LinearisedDynamics(
            kernel(points.x),
            self._targets(points.y),
            f0.reshape(n, -1).double(),
            loss=loss.for_outputs(tuple(f0.shape[1:])),
            k_test_train=kernel(test.x, points.x) if test is not None else None,
            f0_test=f0_test.reshape(len(test), -1).double() if test is not None else None,
            y_test=self._targets(test.y) if test is not None else None,
            jtheta0=jtheta0,
            jtheta0_test=jtheta0_test,
        )
        self.approximate = approximate_points or layout is TRACE
        self.approximate_points = approximate_points
        self._trajectory = self.dynamics.gd_trajectory(
            lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov,
            weight_decay=settings.weight_decay,
        )
        self._dense_steps = dense_then_log_steps()
        self._dense_next = next(self._dense_steps)
        self._dense: Dict[int, Dict[str, Optional[float]]] = {}

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        if self.loss.kind == REGRESSION:
            return y.reshape(y.shape[0], -1).double()
        return y

    def describe(self) -> Dict[str, Any]:
        """What the forecast is, for the run's metadata."""
        return {
            "kind": self.kind,
            "points": len(self.points),
            "indices": list(self.points.indices) if self.approximate_points else None,
            "approximate": self.approximate,
            "approximation": self.dynamics.problem.approximation,
            "kernel_mode": self.kernel_mode,
            "lr": self.settings.lr,
            "momentum": self.settings.momentum,
            "nesterov": self.settings.nesterov,
            "weight_decay": self.settings.weight_decay,
            "assumes": "full-batch SGD on the linearised network (Lee et al. 2019)",
        }

    def max_learning_rate(self, exact: bool = True) -> Optional[float]:
        """The largest stable lr of the linearised model under this loss and momentum
        (:func:`ntk_torch.predict.max_learning_rate`; ``exact=False`` may estimate the
        kernel's top eigenvalue, see :meth:`LinearisedDynamics.max_learning_rate`); None
        for a custom loss."""
        if self.dynamics.loss.closed_form is None:
            return None
        s = self.settings
        return float(self.dynamics.max_learning_rate(
            momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay, exact=exact
        ))

    def at(self, step: int) -> Dict[str, Optional[float]]:
        """Predicted ``train``/``test`` loss (and accuracies) at optimizer step ``step``,
        under their record field names. Steps asked in increasing order are cheapest;
        the dense record (:meth:`dense`) is filled up to ``step`` on the way, and keeps
        ``step`` itself."""
        while self._dense_next < step:
            self._dense[self._dense_next] = self._fields(self._dense_next)
            self._dense_next = next(self._dense_steps)
        fields = self._dense[step] = self._fields(step)
        if step == self._dense_next:
            self._dense_next = next(self._dense_steps)
        return fields

    def _fields(self, step: int) -> Dict[str, Optional[float]]:
        prediction = self._trajectory.at(step)
        fields = {
            records.predicted("train"): float(prediction.train_loss[0]),
            records.predicted("test"): _item(prediction.test_loss),
        }
        if self.classes:
            fields[records.predicted("train", "accuracy")] = _item(prediction.train_accuracy)
            fields[records.predicted("test", "accuracy")] = _item(prediction.test_accuracy)
        return fields

    def dense(self) -> Tuple[List[int], Dict[str, List[Optional[float]]]]:
        """The predictions recorded so far, at every step up to ``DENSE_STEPS``, on the
        log schedule beyond, and wherever :meth:`at` was asked: the steps, and each
        field's values at them."""
        return records.columns(self._dense)


def _item(values: Optional[torch.Tensor]) -> Optional[float]:
    return None if values is None else float(values[0])


def _jtheta0_of(
    fmodel: FunctionalModel, points: LabelledSet, test: Optional[LabelledSet], device: torch.device
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``J theta_0`` on the forecast's points and on the test set (None without one)."""
    with torch.no_grad(), evaluation_context(fmodel.model, device):
        return _jtheta0(fmodel, points.x), (_jtheta0(fmodel, test.x) if test is not None else None)


def _jtheta0(fmodel: FunctionalModel, x: Any) -> torch.Tensor:
    """``J(x) theta_0`` ``(N, O)``: one forward-mode product with the tangent ``theta_0``."""
    x = fmodel.prepare_inputs(x)
    return jvp(lambda p: fmodel(p, x), (fmodel.params,), (fmodel.params,))[1]
