"""The tracker's forecast: which one (the kernel's or the twin's), and running it.

Two forecasts predict the training curve of the network linearised at step 0:

* ``"kernel"`` (:mod:`ntk_torch.forecast`): in function space, from the kernel at step 0
  over the training points; exact and cheap, for full-batch ``torch.optim.SGD`` with one
  set of hyperparameters and a constant learning rate, without clipping.
* ``"twin"`` (:mod:`ntk_torch.twin`): the linearised network trained in parameter space
  with a clone of the user's optimizer, following its learning rate at every step,
  clipping as told, on the minibatches the tracker is shown; any ``torch.optim``
  optimizer that steps without a closure.

:func:`choose` is the one place that decides: ``"auto"`` takes the kernel forecast when it
applies — :func:`kernel_problems` finds nothing it cannot model (an optimizer other than
SGD or per-group hyperparameters, a learning-rate scheduler, which sets ``initial_lr`` in
the optimizer's groups when it is created, clipping, observed minibatches) — and the twin
otherwise. Minibatches are known only once the user shows the first one
(``NTKTracker.observe``), so for a plain SGD optimizer ``"auto"`` prepares both at step 0
and keeps one at the first optimizer step: the twin if a minibatch was observed before it.

:class:`TrackedForecast` runs the chosen one for the tracker: it steps the twin after each
optimizer step, composes the record fields (the network's own loss on the forecast's
points, the prediction, the linearisation gaps), watches for what explains a gap
(:class:`ntk_torch.diagnostics.GapWatch`), and hands the dense forecast to the run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import records
from ._options import check_real
from .diagnostics import GapWatch
from .errors import ForecastWarning, user_stacklevel
from .forecast import LinearisedForecast, sgd_settings
from .functional import evaluation_context
from .losses import Loss
from .probe import LabelledSet, evaluate
from .runs import RunWriter
from .twin import Batch, LinearisedTwin, twin_problems

__all__ = [
    "FORECASTS", "TrackedForecast", "check_forecast", "choose", "clip_options", "forecast_option", "kernel_problems",
    "linearisation_gap",
]

FORECASTS = ("auto", "kernel", "twin")
"""The ``forecast=`` choices of ``NTKTracker`` (and None: no forecast)."""

Forecast = Union[LinearisedForecast, LinearisedTwin]


def check_forecast(forecast: Any) -> Optional[str]:
    """``forecast`` if it is one of :data:`FORECASTS` or None, else a clear error."""
    if forecast is None or (isinstance(forecast, str) and forecast in FORECASTS):
        return forecast
    options = ", ".join(map(repr, FORECASTS))
    raise ValueError(f"forecast must be one of {options} or None, got {forecast!r}")


def forecast_option(forecast: Any, predict: Optional[bool]) -> Optional[str]:
    """``NTKTracker``'s ``forecast`` checked, with its deprecated alias ``predict``
    applied (``predict=False`` is ``forecast=None``; a ``DeprecationWarning`` either way)."""
    forecast = check_forecast(forecast)
    if predict is None:
        return forecast
    warnings.warn(
        "NTKTracker(predict=...) is deprecated: use forecast='auto' (predict=True) or forecast=None "
        "(predict=False)", DeprecationWarning, stacklevel=user_stacklevel(),
    )
    if not isinstance(predict, bool):
        raise TypeError(f"predict must be a bool, got {type(predict).__name__}")
    return forecast if predict else None


def clip_options(clip_grad_norm: Any, clip_grad_value: Any) -> Dict[str, Optional[float]]:
    """``NTKTracker``'s ``clip_grad_norm`` / ``clip_grad_value``, checked (positive)."""
    return {
        name: None if value is None else check_real(name, value, positive=True)
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value))
    }


def has_scheduler(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a learning-rate scheduler was created on ``optimizer`` (they set
    ``initial_lr`` in every parameter group)."""
    return any("initial_lr" in group for group in optimizer.param_groups)


def kernel_problems(optimizer: torch.optim.Optimizer, model: nn.Module, *, clipping: bool,
                    minibatches: bool = False) -> List[str]:
    """What the kernel forecast cannot model in this set-up (empty when it applies)."""
    problems = list(sgd_settings(optimizer, model)[2])
    if has_scheduler(optimizer):
        problems.append("a learning-rate scheduler is attached")
    if clipping:
        problems.append("gradients are clipped")
    if minibatches:
        problems.append("training uses observed minibatches")
    return problems


def choose(requested: Optional[str], optimizer: torch.optim.Optimizer, model: nn.Module, *,
           clipping: bool, minibatches: bool) -> Tuple[Optional[str], List[str]]:
    """The forecast to make, ``"kernel"``, ``"twin"`` or None, and, for None or a
    requested kernel forecast that models the set-up only in part, what stands in the way.

    ``minibatches`` says whether the steps use observed minibatches (as far as is known).
    """
    if requested is None:
        return None, []
    kernel = kernel_problems(optimizer, model, clipping=clipping, minibatches=minibatches)
    twin = twin_problems(optimizer, model)
    if requested == "kernel":
        settings_problems = sgd_settings(optimizer, model)[2]
        return (None, settings_problems) if settings_problems else ("kernel", kernel)
    if requested == "twin" or kernel:
        return (None, twin) if twin else ("twin", [])
    return "kernel", []


def linearisation_gap(actual: Optional[float], predicted: Optional[float], initial: Optional[float]) -> Optional[float]:
    """``|L_actual - L_predicted| / L_actual(step 0)``: the gap as a fraction of the
    initial loss (None where undefined)."""
    if actual is None or predicted is None or not initial or not math.isfinite(initial):
        return None
    return abs(actual - predicted) / initial


def _warn(message: str, category: type = RuntimeWarning) -> None:
    warnings.warn(f"NTKTracker: {message}", category, stacklevel=user_stacklevel())


class TrackedForecast:
    """The forecast of one tracked run: chosen, stepped, recorded, explained.

    Args:
        requested: ``"auto"``, ``"kernel"`` or ``"twin"``.
        model: the module being trained (unwrapped), at step 0.
        optimizer: the user's optimizer.
        points: the training examples the forecast covers; test: optional test set.
        loss, output_fn: the loss and output selection of the tracker.
        train_size: the number of training examples.
        approximate_points: whether ``points`` is a subset of the training data.
        clip_grad_norm, clip_grad_value: how the user clips gradients, if told.
        call_kwargs: the arguments of every model call that are not batched.

    After construction :attr:`forecast` is the forecast made (None when none can be,
    with a ``RuntimeWarning`` saying why). For ``"auto"`` with a plain SGD optimizer it
    is the kernel forecast until the first optimizer step, which keeps it or, when a
    minibatch was observed before that step, replaces it by the twin.
    """

    def __init__(self, requested: str, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 points: LabelledSet, test: Optional[LabelledSet], loss: Loss,
                 output_fn: Optional[Callable[[Any], torch.Tensor]], train_size: int,
                 approximate_points: bool, clip_grad_norm: Optional[float],
                 clip_grad_value: Optional[float], call_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        self.model, self.points, self.loss, self.output_fn = model, points, loss, output_fn
        self.call_kwargs = call_kwargs
        self.train_size = train_size
        clipping = clip_grad_norm is not None or clip_grad_value is not None
        kind, problems = choose(requested, optimizer, model, clipping=clipping, minibatches=False)
        common = dict(model=model, points=points, test=test, loss=loss, output_fn=output_fn,
                      approximate_points=approximate_points, call_kwargs=call_kwargs)
        self.kernel: Optional[LinearisedForecast] = None
        self.twin: Optional[LinearisedTwin] = None
        if kind is None:
            _warn(f"no forecast ({requested!r}): " + "; ".join(problems) + ". Kernel drift is still tracked.")
        elif kind == "kernel":
            self.kernel = LinearisedForecast(**common, **_kernel_options(optimizer, model))
            if problems:
                _warn("the kernel forecast models full-batch SGD at a constant learning rate without clipping, "
                      "but " + "; ".join(problems) + ": forecast='auto' or 'twin' follows these.")
        if kind == "twin" or (kind == "kernel" and requested == "auto" and not twin_problems(optimizer, model)):
            try:
                self.twin = LinearisedTwin(optimizer=optimizer, clip_grad_norm=clip_grad_norm,
                                           clip_grad_value=clip_grad_value, **common)
            except ValueError as error:  # the model cannot be linearised, the optimizer not cloned
                if kind == "twin":
                    _warn(f"no forecast ({requested!r}): {error}. Kernel drift is still tracked.")
        self.pending = requested == "auto" and self.kernel is not None and self.twin is not None
        self.settled = False
        self.forecast: Optional[Forecast] = self.kernel if self.kernel is not None else self.twin
        self._initial_lr = [float(group["lr"]) for group in optimizer.param_groups]
        self._batches: List[Batch] = []
        self._last_batches: List[Batch] = []
        self._initial_losses: Dict[str, Optional[float]] = {}
        self._warned: Dict[str, bool] = {}
        self.watch: Optional[GapWatch] = None
        if self.forecast is not None:
            self.watch = GapWatch(model, train_size, kind=self.forecast.kind, full_batch=True,
                                  max_learning_rate=None, clipping_known=clipping)
            self.attach(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """(Re-)hook the gap watch on the model and ``optimizer``."""
        if self.watch is not None:
            self.watch.attach(optimizer)

    # ------------------------------------------------------------------ training

    def observe(self, batch: Batch) -> None:
        """A minibatch of the coming optimizer step."""
        if self.watch is not None:
            self.watch.observed(len(batch[1]))
        if self.twin is not None and (not self.settled or self.twin.batches == "minibatch"):
            self._batches.append(batch)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After optimizer step ``step``: decide (at the first step seen, for ``"auto"``),
        step the twin, and check for what explains a gap."""
        if self.forecast is None:
            return
        if not self.settled:
            self._settle()
        if self.forecast is self.twin:
            self._step_twin(step, optimizer)
        else:
            self._check_constant_lr(step, optimizer)
        self._batches = []
        self.watch.after_step(step, optimizer)

    def _settle(self) -> None:
        """At the first step: for ``"auto"``, the twin if minibatches were observed, else
        the kernel forecast; the twin's batches; what the gap watch should know."""
        self.settled = True
        minibatches = sum(len(y) for _, y in self._batches) < self.train_size if self._batches else False
        if self.pending:
            self.pending = False
            if minibatches:
                self.kernel, self.forecast = None, self.twin
                self.twin.at(0)  # still at step 0: its dense record starts where the kernel's did
            else:
                self.twin = None
        if self.forecast is self.twin and self._batches:
            self.twin.batches = "minibatch"
        watch = self.watch
        watch.kind = self.forecast.kind
        watch.full_batch = self.forecast is self.kernel or self.twin.batches == "full"
        if self.forecast is self.kernel and self.kernel.loss.closed_form is not None:
            watch.max_learning_rate = self.kernel.max_learning_rate(exact=False)

    def _step_twin(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        batches = None
        if self.twin.batches == "minibatch":
            if not self._batches and not self._warned.get("unobserved"):
                self._warned["unobserved"] = True
                _warn(f"step {step} had no observed batch; the twin repeats the previous one. Call "
                      "tracker.observe(x, y) before every optimizer.step().", ForecastWarning)
            batches = self._batches or self._last_batches
            self._last_batches = batches
        self.twin.step(batches, follow=optimizer)

    def _check_constant_lr(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Warn once when the learning rate leaves the kernel forecast's (a scheduler)."""
        lr = [float(group["lr"]) for group in optimizer.param_groups]
        if self._warned.get("lr") or lr == self._initial_lr:
            return
        self._warned["lr"] = True
        _warn(f"the learning rate changed from {self.kernel.settings.lr} to {lr[0]} by step {step} (a "
              "scheduler?); the kernel forecast keeps the initial learning rate (forecast='twin' follows it)")

    # ------------------------------------------------------------------ records

    def fields(self, step: int, device: torch.device, measured: Mapping[str, Any]) -> Dict[str, Any]:
        """The record fields of the forecast at ``step``: the network's own loss (and
        accuracy) on the forecast's training points, the predictions and the
        linearisation gaps ``|actual - predicted| / actual at step 0`` on the training
        points and, when ``measured`` holds the test loss, on the test set. The losses at
        the first call are the reference."""
        with torch.no_grad(), evaluation_context(self.model, device):
            result = evaluate(self.model, self.points, self.loss, self.output_fn, device, self.call_kwargs)
        fields: Dict[str, Any] = {records.actual(records.TRAIN, key): value for key, value in result.items()}
        fields.update(self.forecast.at(step))
        actual = {**measured, **fields}
        if not self._initial_losses:
            self._initial_losses = {split: actual.get(records.actual(split)) for split in records.FORECAST_SPLITS}
        for split in records.FORECAST_SPLITS:
            fields[records.gap(split)] = linearisation_gap(
                actual.get(records.actual(split)), actual.get(records.predicted(split)),
                self._initial_losses.get(split),
            )
        return fields

    def meta(self) -> Dict[str, Any]:
        """The run metadata of the forecast: ``prediction`` (what it is) and ``forecast``
        (its kind and batches)."""
        description = self.forecast.describe()
        batches = "full" if self.forecast is self.kernel else self.twin.batches
        description["batches"] = batches
        return {"prediction": description, "forecast": {"kind": self.forecast.kind, "batches": batches}}

    def write_dense(self, writer: RunWriter) -> None:
        """The dense forecast so far to the run directory (a warning if that fails: the
        records keep the forecast at every measurement)."""
        steps, columns = self.forecast.dense()
        if not steps:
            return
        try:
            writer.write_forecast(steps, columns)
        except (OSError, TypeError, ValueError) as error:
            _warn(f"the dense forecast was not written ({error}); the records keep the forecast at every "
                  "measurement")

    def detach(self) -> None:
        """Take the gap watch's hooks off."""
        if self.watch is not None:
            self.watch.remove()


def _kernel_options(optimizer: torch.optim.Optimizer, model: nn.Module) -> Dict[str, Any]:
    settings, names, _ = sgd_settings(optimizer, model)
    return {"settings": settings, "param_names": names}
