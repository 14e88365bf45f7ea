"""``NTKTracker``: the empirical NTK of a fixed probe set, measured during training.

The tracker hooks an optimizer's ``step`` and, on a schedule of optimizer steps, computes
the eNTK of the model on a probe (a fixed random subset of the training data), compares it
with the kernel at step 0 and at the previous measurement, and records everything as one
dict per measurement, in memory (``tracker.records``) and, given ``run_dir``, in a run
directory (``load_run``)::

    tracker = NTKTracker(model, train=(x, y), test=(xt, yt), loss="cross_entropy",
                         every=10, run_dir="runs/exp")
    with tracker.attach(optimizer):      # measures step 0 now
        for xb, yb in tracker.batches(loader):   # shows the forecast each minibatch
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()             # measured after steps 10, 20, ...
                                         # leaving the block measures the last step

Do no harm: training with the tracker attached gives bit-identical parameters to training
without it. Measurements run in eval mode under ``torch.no_grad`` on detached parameters,
fork the RNG, and leave every ``.grad``, ``requires_grad`` and ``training`` flag as found.
Only the kernel at step 0 and the previous one stay in memory (and, with a forecast, its
fixed-size state): memory does not grow with the number of steps.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
from torch import nn

from . import records
from ._options import check_bool, check_int
from .drift import parameter_distance
from .errors import NonFiniteKernelError
from .forecasting import Forecast, TrackedForecast, clip_options, forecast_option
from .functional import (
    ParamSelector, check_call_kwargs, check_compatible, evaluation_context, nonfinite_input, unwrap_model,
)
from .lifecycle import Attachment, SigtermGuard, ending
from .provenance import describe, run_metadata
from .losses import CLASSIFICATION, resolve
from .probe import Data, LabelledSet, batch_size, choose_probe, evaluate, load_set, sample_output
from .runs import KEEP_KERNELS, Run, RunWriter, load_run
from .budget import scheduled
from .sharing import is_main_process, rank0_probe
from .sinks import open_sink
from .probe_kernel import probe_kernel
from .progress import StepBar

__all__ = ["NTKTracker"]


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
        progress: show a progress bar on a terminal (tqdm, on stderr; the user's prints stay
            whole above it) with the step, measurements and drift (:class:`~.progress.StepBar`).
        total_steps: the optimizer steps the training will take, for the bar's total.
        tensorboard: a ``SummaryWriter`` or a log directory: every record's numbers as scalars
            ``ntk/<field>`` at the optimizer step, the figures at the end (:mod:`ntk_torch.sinks`).
        analytic_reference: for an ``ntk_torch.models.MLP`` in NTK parametrisation, record
            ``analytic_distance`` from its infinite-width NTK (:mod:`ntk_torch.analytic`).
        seed: seed of the private ``torch.Generator`` that draws the probe.
        overwrite: replace an existing run in ``run_dir``.
        forecast: the predicted training curve of the network linearised at step 0 (see
            below): ``"auto"`` (default), ``"kernel"``, ``"twin"``, or None for none. It
            needs an optimizer (``attach(optimizer)``).
        clip_grad_norm, clip_grad_value: how training clips gradients
            (``clip_grad_norm_(params, max_norm)`` with the 2-norm, ``clip_grad_value_``),
            so that the twin clips the same way.
        max_predict_points: the forecast covers all of ``train`` up to this many
            examples, else a subset of this size drawn with ``seed`` (recorded, and the
            forecast is flagged approximate); the twin's full batch is these examples.
        distributed: share the probe kernel's tiles out over the ``torch.distributed``
            ranks (see below); None (the default) shares them when torch.distributed is
            initialised with more than one process.
        predict: deprecated alias: ``predict=False`` is ``forecast=None``, ``True`` is
            ``forecast="auto"``.
        budget: a fraction such as ``0.1``: measure the schedule's steps only while
            tracking costs at most that fraction of the training time, the log schedule
            measured always (:class:`~ntk_torch.budget.TimeBudget`, ``tracker.budget``).
        kernel: how the probe kernel is measured (:mod:`ntk_torch.probe_kernel`): ``"dense"``
            (formed; the default) or ``"estimate"``: never formed, for probes whose N x N
            kernel is too large, its fields estimated from ``NTKOperator`` products with
            error bars (``<field>_error``); ``mode`` is then ``"trace"``, ``"pntk"`` or
            ``"full"``, ``effective_rank`` is None and no kernels go to ``run_dir``.
        matvecs: with ``kernel="estimate"``, Hutch++ products per estimator (default 60).
        sketch, sketch_seed: ``d`` for the sketched kernel ``(J S)(J S)^T`` (``NTK(sketch=d,
            sketch_seed=...)``), one projection ``S`` for the whole run so that the drift
            compares like with like; with ``kernel="estimate"``, the sketched operator's.
        spectrum: how each formed kernel's spectrum is recorded (:class:`~ntk_torch.drift.Spectrum`):
            ``"full"``, every eigenvalue (``top_eigenvalues`` and ``effective_rank``;
            ``B m^3`` work for a matrix of ``B`` diagonal blocks of ``m`` rows: ``(N O)^3``
            for ``mode="full"``); ``"top"``, the 10 largest by block Lanczos with their
            residuals (``top_eigenvalues_error``), ``effective_rank`` None; ``"auto"`` (the
            default), ``"full"`` while ``B m^3 <= 1024^3``, else ``"top"``. With
            ``kernel="estimate"`` the spectrum is always the top one (``"full"`` is refused).

    Each record (a dict; see ``NTKTracker.measure``) holds:

    (field names and meanings: :mod:`ntk_torch.records`)

    * ``step``, ``time`` (Unix seconds), ``measure_time`` (seconds spent measuring) and
      ``kernel_time`` (of which forming the probe kernel);
    * ``finite``, and ``nonfinite_groups`` when the kernel had NaN/inf entries (the other
      kernel fields are then None; a ``RuntimeWarning`` is issued once per tracker);
    * ``trace``, ``frobenius``, ``top_eigenvalues`` (up to 10, descending),
      ``effective_rank`` of the probe kernel (None where ``spectrum`` computes only the top);
    * ``relative_change`` (|K - K0|_F / |K0|_F) and ``kernel_distance`` from step 0,
      ``velocity`` (kernel distance per step since the previous measurement);
    * ``target_alignment`` (centred) of the kernel with the probe labels;
    * ``layer_share`` {parameter group: trace(K_group) / trace(K)} (None for a sketch or
      an estimate, which have no per-layer kernels);
    * ``param_distance`` |theta - theta_0| / |theta_0|;
    * ``probe_loss``, ``test_loss`` and, for class labels, ``probe_accuracy``,
      ``test_accuracy``, evaluated in eval mode (BatchNorm on running statistics,
      Dropout off), as the kernel is;
    * with a forecast: ``train_loss`` (and ``train_accuracy``) of the network on the
      forecast's training points, ``predicted_train_loss``, ``predicted_test_loss`` (and
      ``predicted_*_accuracy``), and the linearisation gaps ``linearisation_gap`` =
      |train_loss - predicted_train_loss| / train_loss at step 0 and
      ``test_linearisation_gap`` (the same on the test set);
    * ``final``: true on the record made when the tracker is detached or closed (leaving
      ``with tracker.attach(...)`` normally) for a last step the schedule did not measure.

    The forecast is the training curve of the network linearised at step 0 (Lee et al.
    2019), ``f0(x) + J0(x)(theta - theta0)``, in eval mode like the kernel
    (:mod:`ntk_torch.forecasting` chooses, :mod:`ntk_torch.diagnostics` explains gaps):

    * ``"kernel"``: full-batch ``torch.optim.SGD`` (lr, momentum, Nesterov, weight decay)
      in function space from the kernel at step 0 over the training points (``full``,
      exact, while (N O)^2 <= 2^24, else ``trace``, the isotropic approximation); cheap,
      and recorded at every step up to 1000 and on the log schedule beyond for figures.
    * ``"twin"``: the linearised network trained with a clone of the optimizer (any
      ``torch.optim`` one but LBFGS and SparseAdam), at the learning rate the optimizer has
      at each step (schedulers), clipped as ``clip_grad_*`` say, on the minibatches shown
      by :meth:`observe` / :meth:`batches` (else full batch); about two to three training
      steps per step, and a few copies of the parameters.
    * ``"auto"``: the kernel for a plain SGD (one set of hyperparameters, no scheduler, no
      clipping) on full batches (no minibatch observed before the first step), else the twin.

    The forecast uses the exact kernel of its training points whatever ``mode``, ``sketch``
    or ``kernel`` say (a pNTK, sketched or estimated probe kernel is for the drift); for
    many training points lower ``max_predict_points`` or use the twin.

    ``meta["forecast"]`` holds its ``kind`` and ``batches`` (``"full"``/``"minibatch"``),
    ``meta["prediction"]`` how it was made. BatchNorm in train mode, Dropout, a learning
    rate above the stable one, minibatches forecast as full batch and unannounced
    clipping are each warned about once (``ntk_torch.errors.ForecastWarning``).

    A metric that is undefined (e.g. alignment with constant targets) is None.

    Under ``torch.distributed`` with more than one process (or ``distributed=True``),
    every rank computes a share of each probe kernel (``NTK(..., distributed=True,
    gather="rank0")``: rank 0's probe, parameters and buffers, broadcast to the others) and
    rank 0 records and writes; the other ranks count steps and keep no records. Every rank
    must then create the tracker and step it in lockstep, as the optimizer hook does when
    every rank trains (DistributedDataParallel). ``distributed=False`` keeps the kernel on
    rank 0 alone and issues no collective (for a tracker created on rank 0 only).

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
        forecast: Optional[str] = "auto",
        clip_grad_norm: Optional[float] = None,
        clip_grad_value: Optional[float] = None,
        max_predict_points: int = 4096,
        predict: Optional[bool] = None,
        distributed: Optional[bool] = None,
        call_kwargs: Optional[Dict[str, Any]] = None,
        budget: Optional[float] = None,
        tensorboard: Any = None,
        analytic_reference: bool = False,
        total_steps: Optional[int] = None,
        kernel: str = "dense",
        matvecs: Optional[int] = None,
        sketch: Optional[int] = None,
        sketch_seed: int = 0,
        spectrum: str = "auto",
    ) -> None:
        self.model = unwrap_model(model)
        forecast = forecast_option(forecast, predict)
        _check_options(probe_size, max_predict_points, seed, keep_kernels, progress=progress, overwrite=overwrite)
        self._clip = clip_options(clip_grad_norm, clip_grad_value)
        self.schedule, self.budget = scheduled(every, schedule, budget)
        self.call_kwargs = check_call_kwargs(call_kwargs)
        keep_kernels = self._set_up_kernel(
            kernel, keep_kernels, mode=mode, method=method, params=params, output_fn=output_fn, spectrum=spectrum,
            distributed=distributed, sketch=sketch, sketch_seed=sketch_seed, matvecs=matvecs, seed=seed,
            analytic=analytic_reference)
        self.output_fn, self.loss = output_fn, resolve(loss)

        self._load_data(train, test, probe_size, seed)
        self._kernel.start(self.model, self.probe, analytic_reference)
        self._set_up_forecast(train, forecast, max_predict_points, seed)

        self.records: List[Dict[str, Any]] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None  # while attached
        self._main = is_main_process()
        self._progress = StepBar(total_steps, enabled=progress and self._main)
        self._step, self._hook, self._started, self._closed = 0, None, False, False
        self._sigterm = SigtermGuard(self.close)
        self._theta0 = {n: p.detach().clone() for n, p in self._live_params().items()} if self._main else {}

        self._sink, self.run_dir = open_sink(tensorboard, self._main), run_dir  # before the run is claimed
        self._writer: Optional[RunWriter] = None if run_dir is None or not self._main else self._open_run(
            run_dir, dict(probe_size=probe_size, every=every, seed=seed, keep_kernels=keep_kernels), overwrite)

    # ------------------------------------------------------------------ set-up

    def _set_up_kernel(self, kernel: str, keep_kernels: str, **options: Any) -> str:
        """The probe kernel (:func:`~ntk_torch.probe_kernel.probe_kernel`), the tracked
        parameters and their device; returns the ``keep_kernels`` it allows."""
        self._kernel = probe_kernel(self.model, kernel, call_kwargs=self.call_kwargs, **options)
        self._shared_step: Optional[int] = None  # the last step whose kernel this rank helped compute
        selected = self._kernel.ntk.view().params
        self.device = next(iter(selected.values())).device
        self._param_names = list(selected)
        return self._kernel.kept(keep_kernels)

    def _set_up_forecast(self, train: Data, forecast: Optional[str], max_predict_points: int, seed: int) -> None:
        """The forecast asked for and its training points; made at step 0 (``attach``)."""
        self._forecast_kind = forecast
        self._forecast_points = None if forecast is None else self._choose_forecast_points(
            train, min(self._train_size, max_predict_points), seed)
        self._forecasting: Optional[TrackedForecast] = None

    def _open_run(self, run_dir: Union[str, "os.PathLike[str]"], config: Dict[str, Any], overwrite: bool) -> RunWriter:
        """Claim the run directory and write its ``meta.json`` (kernels written in the background)."""
        return RunWriter(run_dir, self._meta(config), keep_kernels=config["keep_kernels"], overwrite=overwrite,
                         background=True)

    def _load_data(self, train: Data, test: Optional[Data], probe_size: int, seed: int) -> None:
        """The probe (rank 0's, when the kernel is shared) and test set on the model's
        device, checked against the model and the loss."""
        probe, self._train_size = choose_probe(train, probe_size, seed, "train")
        if self._kernel.shared:
            probe = rank0_probe(probe)
        self.probe: LabelledSet = probe.to(self.device)
        self.test: Optional[LabelledSet] = load_set(test, "test") if test is not None else None
        self._check_labels(train)

    def _check_labels(self, train: Data) -> None:
        """Check the probe's inputs (finite) and the test set's (train's shapes and dtypes),
        then the probe's, train's (when tensors) and test's labels against the loss."""
        bad = nonfinite_input(self.probe.x, "train")
        if bad is not None:
            raise ValueError(f"the input {bad} holds NaN or inf entries; every kernel would be non-finite")
        if self.test is not None:
            check_compatible(self.probe.x, self.test.x, names=("train", "test"))
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

    def _meta(self, config: Dict[str, Any]) -> dict:
        return run_metadata(
            self.model,
            tracked=self._live_params().values(),
            device=self.device,
            probe=self.probe,
            test=self.test,
            train_size=self._train_size,
            labels=self.probe.y.tolist() if self.loss.kind == CLASSIFICATION and self.probe.y.dim() == 1 else None,
            config={
                **config,
                "schedule": self.schedule.description,
                "mode": self.mode,
                "method": self.method,
                "params": describe(self.params),
                **self._kernel.config(),
                "output_fn": describe(self.output_fn),
                "loss": self.loss.name,
                "forecast": self._forecast_kind,
                **self._clip,
            },
        )

    # ------------------------------------------------------------------ public API

    @property
    def ntk(self) -> Any:
        """The configured :class:`~ntk_torch.NTK` behind the probe kernel (its options)."""
        return self._kernel.ntk

    @property
    def mode(self) -> str:
        return self._kernel.mode

    @property
    def method(self) -> str:
        return self._kernel.method

    @property
    def params(self) -> ParamSelector:
        return self._kernel.params

    @property
    def forecast(self) -> Optional[Forecast]:
        """The forecast made: a :class:`~ntk_torch.forecast.LinearisedForecast` (kernel) or
        a :class:`~ntk_torch.twin.LinearisedTwin`, or None (none asked, none possible, off
        rank 0, or before ``attach``)."""
        return None if self._forecasting is None else self._forecasting.forecast

    @property
    def step_count(self) -> int:
        """Optimizer steps taken since the tracker started (step 0 is before training)."""
        return self._step

    @property
    def initial_kernel(self) -> Optional[torch.Tensor]:
        """The probe kernel at step 0 (None before it is measured, off rank 0, if it was
        not finite, or with ``kernel="estimate"``, which never forms it)."""
        return self._kernel.initial

    @property
    def probe_indices(self) -> List[int]:
        """Positions of the probe's examples in ``train``, sorted."""
        return list(self.probe.indices)

    @property
    def run(self) -> Run:
        """The run directory as ``load_run`` reads it."""
        if self.run_dir is None:
            raise ValueError("this tracker has no run_dir; pass run_dir=... or use tracker.records")
        if self._writer is not None and not self._writer.closed:
            self._writer.flush()  # the kernel being written in the background
        return load_run(self.run_dir)

    def attach(self, optimizer: Optional[torch.optim.Optimizer] = None) -> Attachment:
        """Measure step 0 now, then measure after every scheduled optimizer step.

        Hooks ``optimizer.step`` (``register_step_post_hook``): every call that updates
        the parameters counts as one step. A step that ``torch.amp.GradScaler`` skips for
        inf/NaN gradients does not count (the scaler does not call ``step``, or, for fused
        optimizers, calls it with ``found_inf`` set), nor do backward passes of gradient
        accumulation. Without an optimizer, call ``tracker.step()`` after each update.

        Returns:
            A context manager; leaving it (also by an exception such as
            ``KeyboardInterrupt``, which is re-raised) detaches the hook and closes the
            tracker and its run directory with status ``"completed"``, ``"interrupted"``
            (Ctrl-C) or ``"failed"`` and the reason. A failure or Ctrl-C in the step-0
            set-up here closes it the same way. From here until ``close``, in the main
            thread and when SIGTERM has its default action, a SIGTERM closes the run as
            ``"interrupted"`` and then ends the process as SIGTERM does (a handler runs
            between Python bytecodes, so it waits for a running torch operation).
        """
        self._require_open()
        if self._hook is not None:
            raise RuntimeError("the tracker is already attached to an optimizer; call detach() first")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not self._started:
            self._started = True
            try:  # the step-0 set-up: a failure or Ctrl-C here still closes the run with its status
                forecasting = optimizer is not None and self._forecast_points is not None
                with self._progress.phase("step 0: kernel" + " and forecast" * forecasting):
                    if forecasting:
                        self._start_forecast(optimizer)
                    self.measure()
            except BaseException as error:
                self.close(*ending(error))
                raise
            if self._main:
                self._sigterm.install()
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)
            self.optimizer = optimizer
            if self._forecasting is not None:
                self._forecasting.attach(optimizer)
        return Attachment(self)

    def detach(self) -> None:
        """Measure the last optimizer step if the schedule did not (a record with
        ``final: true``), and remove the optimizer hook; idempotent. The tracker stays
        usable (a forecast's twin does not see steps taken while detached)."""
        self._measure_final()
        self._unhook()

    def _unhook(self) -> None:
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook.remove()
        if self._forecasting is not None:
            self._forecasting.detach()
        self.optimizer = None

    def observe(self, inputs: Any, targets: torch.Tensor) -> None:
        """Show the forecast the minibatch of the coming optimizer step.

        Call it before ``optimizer.step()`` (or iterate ``tracker.batches(loader)``); with
        gradient accumulation, once per micro-batch: the twin averages their losses. The
        twin (``forecast="twin"``, or ``"auto"``, which picks it once a minibatch is
        observed before the first step) then trains on the same minibatches as the
        network. The batch is referenced until the step, not copied; without a forecast
        nothing is kept.

        Args:
            inputs: the batch's inputs, as the model takes them (Tensor, tuple or dict,
                batched on dim 0).
            targets: its labels or targets, a Tensor of the same length.
        """
        self._require_open()
        if not self._started:
            raise RuntimeError("call tracker.attach(optimizer) before observing batches")
        batch_size(inputs, targets, "the observed batch")
        if self._forecasting is not None:
            self._forecasting.observe((inputs, targets))

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Yield the ``(inputs, targets)`` batches of ``loader`` (a ``DataLoader`` or any
        iterable of pairs), showing each to the forecast first (:meth:`observe`)::

            for x, y in tracker.batches(loader):
                ...
        """
        for item in loader:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"tracker.batches needs (inputs, targets) pairs, got a {type(item).__name__}; "
                    "call tracker.observe(inputs, targets) yourself for other batch layouts"
                )
            self.observe(*item)
            yield item

    def step(self) -> Optional[Dict[str, Any]]:
        """Count one optimizer step and measure if the schedule says so.

        For training loops without a ``torch.optim.Optimizer``: call ``attach()`` once
        before training (it measures step 0), then ``step()`` after each update.

        Returns:
            The new record, or None if this step is not measured (or off rank 0).
        """
        entered = time.perf_counter()
        self._require_open()
        if not self._started:
            raise RuntimeError(
                "call tracker.attach() before the first update, so that step 0 (the reference "
                "kernel) is measured; then call tracker.step() after each update"
            )
        self._step += 1
        self._progress.step(self._step)
        if self._forecasting is not None and self.optimizer is not None:
            settled = self._forecasting.settled
            self._forecasting.after_step(self._step, self.optimizer)
            if not settled and self._writer is not None:
                self._writer.update_meta(**self._forecasting.meta())
        if self.budget is not None:
            return self.budget.run(self._step, self.measure, entered)
        return self.measure() if self._step in self.schedule else None

    def measure(self) -> Optional[Dict[str, Any]]:
        """Measure the kernel at the current step now, whatever the schedule.

        Returns:
            The record (the same one if this step was already measured), or None off rank 0.
        """
        self._require_open()
        self._started = True
        if not self._main:
            if self._kernel.shared and self._shared_step != self._step:
                self._kernel.share(self.probe.x)
                self._shared_step = self._step
            return None
        if self.records and self.records[-1][records.STEP] == self._step:
            return self.records[-1]
        return self._append(self._measurement())

    def _measure_final(self) -> None:
        """Measure the current step, marked final, unless it was measured already."""
        if self._started and self._main and not self._closed and self.records \
                and self.records[-1][records.STEP] != self._step:
            record = self._measurement()
            record[records.FINAL] = True
            self._append(record)

    def _append(self, record: Dict[str, Any]) -> Dict[str, Any]:
        self.records.append(record)
        if self._writer is not None:
            self._writer.append(record)
        self._sink.write(record)
        self._progress.measured(record[records.STEP], record[records.RELATIVE_CHANGE])
        return record

    def close(self, status: str = "completed", reason: Optional[str] = None) -> None:
        """Close the tracker and its run directory, recording ``status`` (and ``reason``,
        one line saying why, for a failed or interrupted run); idempotent.

        A ``"completed"`` run first has its last optimizer step measured if the schedule
        did not (a record with ``final: true``); an interrupted or failed one stops where
        it is. The forecast's dense record goes to the run directory
        (``Run.dense_forecast``)."""
        if status == "completed":
            self._measure_final()
        self._unhook()
        self._sigterm.restore()
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            if self._forecasting is not None:
                self._forecasting.write_dense(self._writer)
            self._writer.close(status=status, reason=reason)
        self._sink.close(None if self._writer is None else self._writer.path)
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
        """Make the forecast at step 0 (:class:`~ntk_torch.forecasting.TrackedForecast`),
        or warn why none can be made."""
        if not self._main:
            return
        try:
            tracked = TrackedForecast(
                self._forecast_kind, model=self.model, optimizer=optimizer, points=self._forecast_points,
                test=self.test, loss=self.loss, output_fn=self.output_fn, train_size=self._train_size,
                approximate_points=len(self._forecast_points) < self._train_size, call_kwargs=self.call_kwargs,
                **self._clip,
            )
        except NonFiniteKernelError as error:
            self._skip_forecast(f"the kernel at step 0 over the training points is not finite ({error})")
            return
        if tracked.forecast is None:
            return
        self._forecasting = tracked
        if self._writer is not None:
            self._writer.update_meta(**tracked.meta())

    def _skip_forecast(self, why: str) -> None:
        """No predicted training curve, with a warning saying ``why``; training goes on."""
        if self._forecasting is not None:
            self._forecasting.detach()
        self._forecasting = None
        warnings.warn(
            f"NTKTracker: no predicted training curve: {why}. Kernel drift is still tracked.",
            RuntimeWarning,
            stacklevel=4,
        )
        if self._writer is not None:
            self._writer.update_meta(prediction=None)

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
        fields, kernel = self._kernel.measure(self._step, self.probe.x)
        record.update(fields)
        if not record[records.FINITE]:
            if self._step == 0 and self._forecasting is not None:
                self._skip_forecast("the probe kernel at step 0 is not finite")
        elif kernel is not None and self._writer is not None:
            self._writer.save_kernel(self._step, kernel)
        record[records.PARAM_DISTANCE] = parameter_distance(self._live_params(), self._theta0)
        record.update(self._evaluation())
        if self._forecasting is not None:
            record.update(self._forecasting.fields(self._step, self.device, record))
        record[records.MEASURE_TIME] = time.perf_counter() - started
        return record

    def _evaluation(self) -> Dict[str, Any]:
        """Loss (and accuracy) on the probe and the test set, in eval mode, without grad."""
        fields: Dict[str, Any] = {}
        with torch.no_grad(), evaluation_context(self.model, self.device):
            for split, data in ((records.PROBE, self.probe), (records.TEST, self.test)):
                if data is not None:
                    result = evaluate(self.model, data, self.loss, self.output_fn, self.device, self.call_kwargs)
                    fields.update({records.actual(split, key): value for key, value in result.items()})
        return fields


def _check_options(probe_size, max_predict_points, seed, keep_kernels, **flags: Any) -> None:
    check_int("probe_size", probe_size, minimum=1)
    check_int("max_predict_points", max_predict_points, minimum=1)
    check_int("seed", seed, minimum=0)
    if keep_kernels not in KEEP_KERNELS:
        options = ", ".join(map(repr, KEEP_KERNELS))
        raise ValueError(f"keep_kernels must be one of {options}, got {keep_kernels!r}")
    for name, flag in flags.items():  # progress, overwrite: "no" must not be truthy
        check_bool(name, flag)
