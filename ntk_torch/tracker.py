"""``NTKTracker``: the empirical NTK of a fixed probe set, measured during training.

The tracker hooks an optimizer's ``step`` and, on a schedule of optimizer steps, computes
the eNTK of the model on a probe (a fixed random subset of the training data), compares it
with the kernel at step 0 and at the previous measurement, and records everything as one
dict per measurement, in memory (``tracker.records``) and, given ``run_dir``, in a run
directory (``load_run``)::

    tracker = NTKTracker(model, train=(x, y), test=(xt, yt), loss="cross_entropy",
                         every=10, run_dir="runs/exp")
    with tracker.attach(optimizer):      # measures step 0 now
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()             # measured after steps 10, 20, ...

Do no harm: training with the tracker attached gives bit-identical parameters to training
without it. Measurements run in eval mode under ``torch.no_grad`` on detached parameters,
fork the RNG, and leave every ``.grad``, ``requires_grad`` and ``training`` flag as found.
Only the kernel at step 0 and the previous one stay in memory.
"""

from __future__ import annotations

import math
import os
import platform
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn

from . import records
from ._options import check_int
from ._version import __version__
from .drift import KernelDrift
from .errors import NonFiniteKernelError
from .forecast import LinearisedForecast, current_lr, sgd_settings
from .functional import ParamSelector, check_call_kwargs, evaluation_context, unwrap_model
from .kernel import NTK
from .losses import CLASSIFICATION, resolve
from .probe import Data, LabelledSet, choose_probe, evaluate, load_set, sample_output
from .runs import KEEP_KERNELS, Run, RunWriter, load_run
from .schedule import Schedule

__all__ = ["NTKTracker"]


def _is_main_process() -> bool:
    """Rank 0 of the default process group, or True outside torch.distributed."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0


def _versions() -> Dict[str, str]:
    return {
        "ntk_torch": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _describe(value: Any) -> Any:
    """A JSON-friendly description of a configuration value (callables by name)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, nn.Module):
        return type(value).__name__
    return getattr(value, "__qualname__", type(value).__name__)


class NTKTracker:
    """Measures the empirical NTK of a probe set during training and records its drift.

    Args:
        model: the ``nn.Module`` being trained; a ``torch.compile``'d module, a
            ``DistributedDataParallel``, ``DataParallel`` or FSDP wrapper is measured
            through the module inside, called eagerly (training through the wrapper is
            bit-identical with and without the tracker; the compiled module is never
            recompiled by it). Create the tracker after moving the model to its device.
        train: the training data, an ``(x, y)`` pair (``x`` a Tensor, tuple or dict of
            Tensors batched on dim 0) or a map-style ``Dataset`` of ``(input, label)``
            pairs. The probe is ``probe_size`` of its examples drawn with ``seed``.
        probe_size: number of probe examples N; kernels are (N, N) in trace mode.
        test: optional held-out data (same forms as ``train``), all of it evaluated for
            ``test_loss``/``test_accuracy``; a ``Dataset`` is read once, into memory.
        loss: ``"cross_entropy"`` (integer class labels), ``"mse"`` (float targets of the
            output's shape), or any callable ``loss(output, y)`` returning the mean loss
            (an ``nn.CrossEntropyLoss``/``nn.MSELoss`` instance is checked like its name).
        every: measure after every ``every``-th optimizer step (and at step 0).
        schedule: replaces ``every`` when given: an explicit list of steps, or ``"log"``
            (steps 0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, ...; see :mod:`ntk_torch.schedule`).
        mode, method, params, output_fn, call_kwargs: as for ``empirical_ntk``;
            ``method="auto"`` picks the fastest applicable engine. ``output_fn`` also
            applies to the outputs the loss sees and ``call_kwargs`` (arguments that are
            not batched) to every evaluation; ``params`` also narrows the parameter
            distance.
        run_dir: a run directory to write (``meta.json``, ``metrics.jsonl``, kernels); None
            keeps the records in memory only.
        keep_kernels: which measured kernels go to ``run_dir`` (see ``RunWriter``):
            ``"log"`` (the m-th kernel for m = 0 and m a power of two), ``"all"``,
            ``"first_last"`` or ``"none"``.
        progress: show a progress line (tqdm) with the step and drift.
        seed: seed of the private ``torch.Generator`` that draws the probe.
        overwrite: replace an existing run in ``run_dir``.
        predict: forecast the training curve from the kernel at step 0 (see below) when
            attached to a ``torch.optim.SGD`` optimizer.
        max_predict_points: the forecast covers all of ``train`` up to this many
            examples, else a subset of this size drawn with ``seed`` (recorded, and the
            forecast is flagged approximate).

    Each record (a dict; see ``NTKTracker.measure``) holds:

    (field names and meanings: :mod:`ntk_torch.records`)

    * ``step``, ``time`` (Unix seconds), ``measure_time`` (seconds spent measuring);
    * ``finite``, and ``nonfinite_groups`` when the kernel had NaN/inf entries (the other
      kernel fields are then None; a ``RuntimeWarning`` is issued once per tracker);
    * ``trace``, ``frobenius``, ``top_eigenvalues`` (up to 10, descending),
      ``effective_rank`` of the probe kernel;
    * ``relative_change`` (|K - K0|_F / |K0|_F) and ``kernel_distance`` from step 0,
      ``velocity`` (kernel distance per step since the previous measurement);
    * ``target_alignment`` (centred) of the kernel with the probe labels;
    * ``layer_share`` {parameter group: trace(K_group) / trace(K)};
    * ``param_distance`` |theta - theta_0| / |theta_0|;
    * ``probe_loss``, ``test_loss`` and, for class labels, ``probe_accuracy``,
      ``test_accuracy``, evaluated in eval mode (BatchNorm on running statistics,
      Dropout off), as the kernel is;
    * with a forecast: ``train_loss`` (and ``train_accuracy``) of the network on the
      forecast's training points, ``predicted_train_loss``, ``predicted_test_loss`` (and
      ``predicted_*_accuracy``), and the linearisation gaps ``linearisation_gap`` =
      |train_loss - predicted_train_loss| / train_loss at step 0 and
      ``test_linearisation_gap`` (the same on the test set).

    The forecast is what full-batch ``torch.optim.SGD`` (the optimizer's lr, momentum,
    Nesterov and weight decay) would do to the network linearised at step 0 (Lee et al.
    2019), computed by :mod:`ntk_torch.forecast` from the kernel at step 0 over the training
    points: the ``full`` kernel (exact) while (N O)^2 <= 2^24, else the ``trace`` kernel
    (the isotropic approximation, flagged in ``meta["prediction"]``). What it cannot
    model — another optimizer such as Adam, per-group hyperparameters, dampening — is
    named in a warning and no forecast is made; a learning rate that changes later (a
    scheduler) is warned about once. Minibatch SGD follows the full-batch forecast only
    on average.

    A metric that is undefined (e.g. alignment with constant targets) is None.

    Under ``torch.distributed`` only rank 0 measures and writes (no collectives are
    issued); the other ranks count steps and keep no records.

    Raises:
        ValueError / TypeError: naming the argument at fault, e.g. ``probe_size`` larger
            than ``train``, empty data, labels that do not suit ``loss``, an unknown
            ``schedule``.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Data,
        *,
        probe_size: int = 256,
        test: Optional[Data] = None,
        loss: Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "cross_entropy",
        every: int = 10,
        schedule: Union[None, str, Iterable[int]] = None,
        mode: str = "trace",
        method: str = "auto",
        params: ParamSelector = None,
        output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        run_dir: Union[str, "os.PathLike[str]", None] = None,
        keep_kernels: str = "log",
        progress: bool = True,
        seed: int = 0,
        overwrite: bool = False,
        predict: bool = True,
        max_predict_points: int = 4096,
        call_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.model = unwrap_model(model)
        _check_options(probe_size, max_predict_points, predict, seed, keep_kernels, progress)
        self.schedule = Schedule(every, schedule)
        self.call_kwargs = check_call_kwargs(call_kwargs)
        self.ntk = NTK(
            self.model, mode=mode, method=method, params=params, output_fn=output_fn, per_layer=True,
            call_kwargs=self.call_kwargs,
        )
        self.output_fn = output_fn
        self.loss = resolve(loss)
        selected = self.ntk.view().params
        self.device = next(iter(selected.values())).device

        probe, train_size = choose_probe(train, probe_size, seed, "train")
        self.probe: LabelledSet = probe.to(self.device)
        self.test: Optional[LabelledSet] = load_set(test, "test") if test is not None else None
        self._check_labels(train)
        self._train_size = train_size
        self._forecast_points = (
            self._choose_forecast_points(train, min(train_size, max_predict_points), seed) if predict else None
        )
        self.forecast: Optional[LinearisedForecast] = None
        self.drift = KernelDrift(self.ntk.options.layout, self.probe.y)

        self.records: List[Dict[str, Any]] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None  # while attached
        self._main = _is_main_process()
        self._step, self._started, self._closed, self._hook = 0, False, False, None
        self._warned_nonfinite = self._warned_lr = False
        self._param_names = list(selected)
        self._theta0 = {n: p.detach().clone() for n, p in self._live_params().items()} if self._main else {}

        self.run_dir = run_dir
        self._writer: Optional[RunWriter] = None
        if run_dir is not None and self._main:
            config = dict(probe_size=probe_size, every=every, seed=seed, keep_kernels=keep_kernels)
            self._writer = RunWriter(run_dir, self._meta(train_size, config), keep_kernels=keep_kernels,
                                     overwrite=overwrite)
        self._progress = self._progress_bar() if progress and self._main else None

    # ------------------------------------------------------------------ set-up

    def _check_labels(self, train: Data) -> None:
        """Check the probe's, train's (when tensors) and test's labels against the loss."""
        with torch.no_grad(), evaluation_context(self.model, self.device):
            output = sample_output(self.model, self.probe, self.output_fn, self.call_kwargs)
        labels = train[1] if isinstance(train, (tuple, list)) else self.probe.y
        self.loss.check_targets(labels, output, "train", probabilities=False)
        if self.test is not None:
            self.loss.check_targets(self.test.y, output, "test", probabilities=False)

    def _choose_forecast_points(self, train: Data, size: int, seed: int) -> LabelledSet:
        """The training examples the forecast covers: ``size`` of them drawn with ``seed``
        (all of them when ``size`` is the training set's)."""
        points, _ = choose_probe(train, size, seed, "train")
        return points.to(self.device)

    def _live_params(self) -> Dict[str, torch.Tensor]:
        """The model's current tracked parameters, by name."""
        named = dict(self.model.named_parameters())
        return {name: named[name] for name in self._param_names}

    def _meta(self, train_size: int, config: Dict[str, Any]) -> dict:
        all_params = list(self.model.parameters())
        options = self.ntk.options
        return {
            "model": {
                "class": type(self.model).__name__,
                "summary": str(self.model),
                "num_params": sum(p.numel() for p in all_params),
                "num_trainable": sum(p.numel() for p in all_params if p.requires_grad),
                "num_tracked": sum(p.numel() for p in self._live_params().values()),
                "device": str(self.device),
            },
            "probe": {
                "size": len(self.probe),
                "indices": list(self.probe.indices),
                "train_size": train_size,
                "labels": self._class_labels(),
            },
            "test": {"size": len(self.test)} if self.test is not None else None,
            "config": {
                "probe_size": config["probe_size"],
                "every": config["every"],
                "schedule": self.schedule.description,
                "mode": self.ntk.mode,
                "method": self.ntk.method,
                "params": _describe(options.params),
                "output_fn": _describe(self.output_fn),
                "loss": self.loss.name,
                "keep_kernels": config["keep_kernels"],
                "seed": config["seed"],
            },
            "versions": _versions(),
            "created": time.time(),
        }

    def _class_labels(self) -> Optional[List[int]]:
        """The probe's class labels (for figures sorted by class), when it has classes."""
        y = self.probe.y
        if self.loss.kind == CLASSIFICATION and y.dim() == 1:
            return y.tolist()
        return None

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(desc="NTK", unit=" measurements", leave=True)

    # ------------------------------------------------------------------ public API

    @property
    def mode(self) -> str:
        return self.ntk.mode

    @property
    def method(self) -> str:
        return self.ntk.method

    @property
    def params(self) -> ParamSelector:
        return self.ntk.options.params

    @property
    def step_count(self) -> int:
        """Optimizer steps taken since the tracker started (step 0 is before training)."""
        return self._step

    @property
    def initial_kernel(self) -> Optional[torch.Tensor]:
        """The probe kernel at step 0 (None before it is measured, off rank 0, or if it
        was not finite)."""
        return self.drift.initial

    @property
    def probe_indices(self) -> List[int]:
        """Positions of the probe's examples in ``train``, sorted."""
        return list(self.probe.indices)

    @property
    def run(self) -> Run:
        """The run directory as ``load_run`` reads it."""
        if self.run_dir is None:
            raise ValueError("this tracker has no run_dir; pass run_dir=... or use tracker.records")
        return load_run(self.run_dir)

    def attach(self, optimizer: Optional[torch.optim.Optimizer] = None) -> "_Attachment":
        """Measure step 0 now, then measure after every scheduled optimizer step.

        Hooks ``optimizer.step`` (``register_step_post_hook``): every call that updates
        the parameters counts as one step. A step that ``torch.amp.GradScaler`` skips for
        inf/NaN gradients does not count (the scaler does not call ``step``, or, for fused
        optimizers, calls it with ``found_inf`` set), nor do backward passes of gradient
        accumulation. Without an optimizer, call ``tracker.step()`` after each update.

        Returns:
            A context manager; leaving it (also by an exception such as
            ``KeyboardInterrupt``, which is re-raised) detaches the hook and closes the
            tracker and its run directory.
        """
        self._require_open()
        if self._hook is not None:
            raise RuntimeError("the tracker is already attached to an optimizer; call detach() first")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not self._started:
            if optimizer is not None and self._forecast_points is not None:
                self._start_forecast(optimizer)
            self._started = True
            self.measure()
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)
            self.optimizer = optimizer
        return _Attachment(self)

    def detach(self) -> None:
        """Remove the optimizer hook; idempotent. The tracker stays usable."""
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook.remove()
        self.optimizer = None

    def step(self) -> Optional[Dict[str, Any]]:
        """Count one optimizer step and measure if the schedule says so.

        For training loops without a ``torch.optim.Optimizer``: call ``attach()`` once
        before training (it measures step 0), then ``step()`` after each update.

        Returns:
            The new record, or None if this step is not measured (or off rank 0).
        """
        self._require_open()
        if not self._started:
            raise RuntimeError(
                "call tracker.attach() before the first update, so that step 0 (the reference "
                "kernel) is measured; then call tracker.step() after each update"
            )
        self._step += 1
        return self.measure() if self._step in self.schedule else None

    def measure(self) -> Optional[Dict[str, Any]]:
        """Measure the kernel at the current step now, whatever the schedule.

        Returns:
            The record (the same one if this step was already measured), or None off rank 0.
        """
        self._require_open()
        self._started = True
        if not self._main:
            return None
        if self.records and self.records[-1][records.STEP] == self._step:
            return self.records[-1]
        record = self._measurement()
        self.records.append(record)
        if self._writer is not None:
            self._writer.append(record)
        if self._progress is not None:
            self._progress.set_postfix(step=record[records.STEP], drift=record[records.RELATIVE_CHANGE],
                                       refresh=False)
            self._progress.update()
        return record

    def close(self, status: str = "completed") -> None:
        """Detach, and close the run directory recording ``status``; idempotent."""
        self.detach()
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close(status=status)
        if self._progress is not None:
            self._progress.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("attached" if self._hook is not None else "open")
        return (
            f"NTKTracker({type(self.model).__name__}, probe={len(self.probe)}, "
            f"schedule={self.schedule.description!r}, step={self._step}, "
            f"{len(self.records)} records, {state})"
        )

    def _start_forecast(self, optimizer: torch.optim.Optimizer) -> None:
        """Build the forecast from the kernel at step 0, or warn what cannot be modelled."""
        if not self._main:
            return
        settings, names, problems = sgd_settings(optimizer, self.model)
        if problems:
            warnings.warn(
                "NTKTracker: no predicted training curve: " + "; ".join(problems) + ". Kernel "
                "drift is still tracked.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.forecast = LinearisedForecast(
            model=self.model,
            points=self._forecast_points,
            test=self.test,
            loss=self.loss,
            settings=settings,
            param_names=names,
            output_fn=self.output_fn,
            approximate_points=len(self._forecast_points) < self._train_size,
            schedule=self.schedule,
            call_kwargs=self.call_kwargs,
        )
        if self._writer is not None:
            self._writer.update_meta(prediction=self.forecast.describe())

    # ------------------------------------------------------------------ hooks

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("this NTKTracker is closed; create a new one to track again")

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``optimizer.step`` post-hook: count the step unless GradScaler skipped it."""
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for fused optimizers
        if isinstance(found_inf, torch.Tensor) and bool(found_inf.item()):
            return
        self.step()

    # ------------------------------------------------------------------ measurement

    def _measurement(self) -> Dict[str, Any]:
        """One record: the step, the kernel's fields, the parameter distance, the losses
        and the forecast (see :mod:`ntk_torch.records`)."""
        started = time.perf_counter()
        record: Dict[str, Any] = {records.STEP: self._step, records.TIME: time.time()}
        kernels, nonfinite_groups = self._measure_kernel()
        if kernels is None:
            record.update({records.FINITE: False, records.NONFINITE_GROUPS: nonfinite_groups})
            record.update(self.drift.nonfinite())
        else:
            record[records.FINITE] = True
            record.update(self.drift.fields(self._step, kernels))
            if self._writer is not None:
                self._writer.save_kernel(self._step, kernels.total)
        record[records.PARAM_DISTANCE] = self._parameter_distance()
        record.update(self._evaluation())
        if self.forecast is not None:
            self._warn_if_lr_changed()
            record.update(self.forecast.fields(self._step, self.model, self.device, record))
        record[records.MEASURE_TIME] = time.perf_counter() - started
        return record

    def _measure_kernel(self):
        """The per-layer probe kernels at this step and no groups, or, when they are not
        finite, None and the groups at fault (and a ``RuntimeWarning``, the first time)."""
        try:
            return self.ntk(self.probe.x), []
        except NonFiniteKernelError as error:
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    f"NTKTracker: the kernel at step {self._step} is not finite ({error}); "
                    "the step is recorded with finite=False and training goes on. Later "
                    "non-finite steps are recorded without a warning.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None, list(error.groups)

    def _parameter_distance(self) -> Optional[float]:
        """|theta - theta_0| / |theta_0| over the tracked parameters, in float64."""
        moved = reference = 0.0
        with torch.no_grad():
            for name, p in self._live_params().items():
                p0 = self._theta0[name]
                moved += float(torch.linalg.vector_norm(p - p0, dtype=torch.float64)) ** 2
                reference += float(torch.linalg.vector_norm(p0, dtype=torch.float64)) ** 2
        return math.sqrt(moved / reference) if reference > 0 else None

    def _evaluation(self) -> Dict[str, Any]:
        """Loss (and accuracy) on the probe and the test set, in eval mode, without grad."""
        fields: Dict[str, Any] = {}
        with torch.no_grad(), evaluation_context(self.model, self.device):
            for split, data in ((records.PROBE, self.probe), (records.TEST, self.test)):
                if data is not None:
                    result = evaluate(self.model, data, self.loss, self.output_fn, self.device, self.call_kwargs)
                    fields.update({records.actual(split, key): value for key, value in result.items()})
        return fields

    def _warn_if_lr_changed(self) -> None:
        """Warn once when the optimizer's learning rate has left the forecast's."""
        initial = self.forecast.settings.lr
        if self._warned_lr or self.optimizer is None or current_lr(self.optimizer) == initial:
            return
        self._warned_lr = True
        warnings.warn(
            f"NTKTracker: the learning rate changed from {initial} to "
            f"{current_lr(self.optimizer)} by step {self._step} (a scheduler?); the "
            "predicted curve keeps the initial learning rate",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_options(probe_size, max_predict_points, predict, seed, keep_kernels, progress) -> None:
    check_int("probe_size", probe_size, minimum=1)
    check_int("max_predict_points", max_predict_points, minimum=1)
    if not isinstance(predict, bool):
        raise TypeError(f"predict must be a bool, got {type(predict).__name__}")
    check_int("seed", seed, minimum=0)
    if keep_kernels not in KEEP_KERNELS:
        options = ", ".join(map(repr, KEEP_KERNELS))
        raise ValueError(f"keep_kernels must be one of {options}, got {keep_kernels!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")


class _Attachment:
    """What ``NTKTracker.attach`` returns: leaving the ``with`` block closes the tracker."""

    def __init__(self, tracker: NTKTracker) -> None:
        self.tracker = tracker

    def __enter__(self) -> NTKTracker:
        return self.tracker

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        if exc_type is None:
            status = "completed"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "interrupted"
        else:
            status = "failed"
        self.tracker.close(status=status)
        return False  # re-raise
