r"""The tracker's probe kernel: how it is measured, and how a measurement becomes record fields.

:func:`probe_kernel` checks the tracker's kernel options once and returns one of two kinds:

* :class:`DenseProbe`: the kernel is formed. Exactly, as ``NTK(mode, method,
  per_layer=True)`` on the probe (its tiles shared out over the ranks under
  ``torch.distributed``), with every parameter group's kernel for ``layer_share``; or,
  with ``sketch=d``, as the sketched kernel ``NTK(sketch=d, sketch_seed=s)`` (one random
  projection for the whole run, so that the drift compares like with like; a sketch has no
  per-layer kernels, so ``layer_share`` is None). :class:`~ntk_torch.drift.KernelDrift`
  turns each kernel into its record's fields; the kernel at step 0 and the previous one
  stay in memory, and each kernel can go to the run directory.
* :class:`EstimatedProbe` (``kernel="estimate"``): the kernel is never formed. Each
  measurement builds an :class:`~ntk_torch.NTKOperator` on the probe at the current
  parameters (a snapshot), and keeps the one of step 0 and the previous one. With ``m``
  matvecs (Hutch++, :mod:`ntk_torch.estimate`; ``K`` now, ``K0`` at step 0, ``Kp`` at the
  previous measurement, ``F = |K|_F``):

  ==================  ============================================  =========================
  field               estimated as                                  operator products
  ==================  ============================================  =========================
  ``trace``           Hutch++ ``tr(K)``                             ``m``
  ``frobenius``       Hutch++ ``tr(K^T K)``, square-rooted          ``2 m``
  ``relative_change`` ``D / F0``, ``D = |K - K0|_F`` by Hutch++      ``4 m``
                      on the difference (``estimate.distance``)
  ``kernel_distance`` ``1 - <K, K0> / (F F0) = (D^2 - (F - F0)^2)    (the same ``D``)
                      / (2 F F0)``
  ``velocity``        that distance from ``Kp``, per step            ``4 m``
  target alignment    ``tr(Yc^T K Yc) / (|Kc|_F |Yc Yc^T|_F)``,     one of ``C + 1`` columns
                      ``Yc = H Y`` exact, ``|Kc|_F^2 = F^2 -
                      2 |K 1|^2 / n + (1^T K 1)^2 / n^2``
  top eigenvalues     :func:`~ntk_torch.eigsh`, ``k = min(10,       at most ``10 k``
                      N - 1)``, every measurement (it costs less
                      than one estimator)
  ==================  ============================================  =========================

  ``D`` is estimated directly rather than as ``sqrt(F^2 + F0^2 - 2 <K, K0>)``: its error
  then scales with the drift ``D`` itself, not with ``F``, which matters because the
  drift is small exactly when it is interesting. Each field's estimated standard deviation
  goes in ``<field>_error`` (first-order propagation of the estimators' errors); for the
  eigenvalues, each Ritz value's residual, within which an eigenvalue lies. One product
  costs about two passes (a vjp and a jvp) over the probe per output for ``trace`` and one
  for ``pntk``, so a measurement is about ``11 m + 10 k`` products. Memory is linear in N,
  never ``N x N``: the operators' parameter snapshots, the Lanczos basis (``N x 10 k``) and
  a product's work (for ``trace`` about ``k O^2 N`` floats for ``k`` columns; a test tracks
  16,000 examples, whose float64 kernel would take 2 GB, in about 0.1 GB). ``effective_rank`` (the
  whole spectrum) and ``layer_share`` are None, and no kernel is written to disk. A kernel
  whose estimated trace or norm is not finite is recorded as not finite, with no
  ``nonfinite_groups`` (the products do not tell the groups apart).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import estimate, metrics, records
from ._options import check_bool, check_choice, check_int
from .analytic import reference_kernel
from .drift import SPECTRA, TOP_EIGENVALUES, KernelDrift
from .errors import NonFiniteKernelError
from .estimate import Estimate
from .kernel import NTK, NTKOperator
from .kernel.operator import OPERATOR_MODES
from .kernel.sketch import check_sketch
from .probe import LabelledSet
from .sharing import shares_kernel
from .spectral import eigsh

__all__ = ["DenseProbe", "EstimatedProbe", "KERNELS", "probe_kernel"]

KERNELS = ("dense", "estimate")
"""How the tracker measures its probe kernel (``NTKTracker(kernel=...)``)."""
DEFAULT_MATVECS = 60
"""Hutch++ products per estimator with ``kernel="estimate"`` (as :mod:`ntk_torch.estimate`)."""
EIGSH_TOL = 1e-6
"""Relative residual at which :func:`~ntk_torch.eigsh` accepts a top eigenvalue."""

Fields = Dict[str, Any]


def probe_kernel(model: nn.Module, kernel: str = "dense", *, mode: str, method: str, params: Any, output_fn: Any,
                 call_kwargs: Any, distributed: Optional[bool], sketch: Optional[int], sketch_seed: int,
                 matvecs: Optional[int], seed: int, analytic: bool, spectrum: str = "auto"):
    """The tracker's probe kernel, its options checked (:class:`DenseProbe` or
    :class:`EstimatedProbe`; the module docstring).

    Raises:
        ValueError / TypeError: naming the option at fault, or the two that do not combine.
    """
    check_choice("kernel", kernel, KERNELS)
    check_sketch(sketch, sketch_seed)
    check_bool("analytic_reference", analytic)
    check_choice("spectrum", spectrum, SPECTRA)
    if distributed is not None:
        check_bool("distributed", distributed)
    common = dict(mode=mode, params=params, output_fn=output_fn, call_kwargs=call_kwargs)
    sketched = dict(sketch=sketch, sketch_seed=sketch_seed)
    if kernel == "dense" and matvecs is not None:
        raise ValueError("matvecs sets the estimators of kernel='estimate'; pass kernel='estimate' or drop matvecs")
    if kernel == "dense" and sketch is None:
        return DenseProbe(model, method=method, distributed=distributed, spectrum=spectrum, **common, **sketched)
    what = "kernel='estimate'" if kernel == "estimate" else f"sketch={sketch}"
    if distributed:
        raise ValueError(f"{what} computes the probe kernel on one process; distributed=True shares only "
                         "the dense kernel's tiles (leave distributed unset)")
    if method != "auto":
        raise ValueError(f"{what} does not use method (it picks an engine of the dense kernel); "
                         f"leave it 'auto', got {method!r}")
    if kernel == "dense":
        return DenseProbe(model, method=method, distributed=False, spectrum=spectrum, **common, **sketched)
    if spectrum == "full":
        raise ValueError("spectrum='full' needs the formed kernel's every eigenvalue; kernel='estimate' records "
                         "only the top ones (leave spectrum 'auto' or pass 'top')")
    if analytic:
        raise ValueError("analytic_reference compares the dense probe kernel with the infinite-width one; "
                         "it does not combine with kernel='estimate'")
    steps = DEFAULT_MATVECS if matvecs is None else check_int("matvecs", matvecs, minimum=3)
    return EstimatedProbe(model, matvecs=steps, seed=seed, **common, **sketched)


class _Probe:
    """What both kinds share: the configured ``NTK`` (options, parameters, device) and
    the warning, once, for a kernel that is not finite."""

    kind = "dense"

    def __init__(self, ntk: NTK, sketch: Optional[int], sketch_seed: int) -> None:
        self.ntk = ntk
        self.sketch, self.sketch_seed = sketch, sketch_seed
        self.shared = False  # whether the ranks compute each kernel together
        self._warned = False

    @property
    def mode(self) -> str:
        return self.ntk.mode

    @property
    def method(self) -> str:
        return self.ntk.method

    @property
    def params(self) -> Any:
        return self.ntk.options.params

    def config(self) -> Fields:
        """What ``meta["config"]`` records of the probe kernel."""
        sketch = {} if self.sketch is None else {"sketch_seed": self.sketch_seed}
        return {"kernel": self.kind, "sketch": self.sketch, **sketch}

    def kept(self, keep_kernels: str) -> str:
        """Which kernels the run directory keeps (``keep_kernels``, checked)."""
        return keep_kernels

    def _nonfinite(self, step: int, groups: Any, why: str) -> Fields:
        """The fields of a step whose kernel is not finite (a ``RuntimeWarning`` the first time)."""
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"NTKTracker: the kernel at step {step} is not finite ({why}); the step is recorded with "
                "finite=False and training goes on. Later non-finite steps are recorded without a warning.",
                RuntimeWarning,
                stacklevel=4,
            )
        names = records.KERNEL_STATISTICS + records.DRIFT + (records.LAYER_SHARE,)
        return {records.FINITE: False, records.NONFINITE_GROUPS: list(groups), **dict.fromkeys(names)}


class DenseProbe(_Probe):
    """The probe kernel formed: exact per parameter group, or sketched (module docstring)."""

    def __init__(self, model: nn.Module, *, mode: str, method: str, params: Any, output_fn: Any, call_kwargs: Any,
                 distributed: Optional[bool], sketch: Optional[int], sketch_seed: int, spectrum: str = "auto") -> None:
        common = dict(mode=mode, method=method, params=params, output_fn=output_fn, call_kwargs=call_kwargs)
        if sketch is None:
            shared = shares_kernel(distributed)
            ntk = NTK(model, per_layer=True, distributed=shared, gather="rank0" if shared else "all", **common)
        else:
            shared, ntk = False, NTK(model, sketch=sketch, sketch_seed=sketch_seed, **common)
        super().__init__(ntk, sketch, sketch_seed)
        self.shared = shared
        self.spectrum = spectrum
        self.drift: Optional[KernelDrift] = None

    def start(self, model: nn.Module, probe: LabelledSet, analytic: bool) -> None:
        """Ready the fields for ``probe`` (and the infinite-width reference, if ``analytic``)."""
        layout = self.ntk.options.layout
        reference = reference_kernel(model, probe.x, layout, self.ntk.view().params) if analytic else None
        self.drift = KernelDrift(layout, probe.y, reference, spectrum=self.spectrum)

    def config(self) -> Fields:
        return {**super().config(), "spectrum": self.spectrum}

    @property
    def initial(self) -> Optional[torch.Tensor]:
        """The kernel at step 0 (None before it is measured or if it was not finite)."""
        return None if self.drift is None else self.drift.initial

    def measure(self, step: int, x: Any) -> Tuple[Fields, Optional[torch.Tensor]]:
        """The record fields of the kernel on ``x`` now, and that kernel (None if not finite)."""
        started = time.perf_counter()
        try:
            kernels = self.ntk(x)
        except NonFiniteKernelError as error:
            return self._nonfinite(step, error.groups, str(error)), None
        seconds = time.perf_counter() - started
        fields = {records.FINITE: True, records.KERNEL_TIME: seconds, **self.drift.fields(step, kernels)}
        return fields, kernels if isinstance(kernels, torch.Tensor) else kernels.total

    def share(self, x: Any) -> None:
        """Off rank 0, with a shared kernel: this rank's tiles, which go to rank 0 (a
        non-finite kernel is recorded there)."""
        try:
            self.ntk(x)
        except NonFiniteKernelError:
            pass


class _Measured(NamedTuple):
    step: int
    operator: NTKOperator
    norm: Estimate


class EstimatedProbe(_Probe):
    """The probe kernel read through products only (``kernel="estimate"``; module docstring)."""

    kind = "estimate"

    def __init__(self, model: nn.Module, *, mode: str, params: Any, output_fn: Any, call_kwargs: Any,
                 sketch: Optional[int], sketch_seed: int, matvecs: int, seed: int) -> None:
        if not (isinstance(mode, str) and mode in OPERATOR_MODES):
            raise ValueError(f"kernel='estimate' needs an operator's mode, one of "
                             f"{', '.join(map(repr, OPERATOR_MODES))}, got mode={mode!r}")
        super().__init__(NTK(model, mode=mode, params=params, output_fn=output_fn, call_kwargs=call_kwargs),
                         sketch, sketch_seed)
        self.model = model
        self._options = dict(mode=mode, params=params, output_fn=output_fn, call_kwargs=call_kwargs,
                             sketch=sketch, sketch_seed=sketch_seed)
        self.matvecs, self.seed = matvecs, seed
        self.initial_operator: Optional[_Measured] = None
        self._previous: Optional[_Measured] = None
        self._labels: Optional[torch.Tensor] = None
        self._targets: Optional[metrics.CentredTargets] = None

    initial = None  # the kernel at step 0 is never formed

    def config(self) -> Fields:
        return {**super().config(), "matvecs": self.matvecs}

    def kept(self, keep_kernels: str) -> str:
        """No kernel to keep: ``"none"``; ``"all"`` and ``"first_last"`` are refused (the
        default ``"log"`` reads as ``"none"``)."""
        if keep_kernels in ("all", "first_last"):
            raise ValueError(f"kernel='estimate' forms no kernel to keep; keep_kernels={keep_kernels!r} needs "
                             "kernel='dense' (leave keep_kernels at its default or pass 'none')")
        return "none"

    def start(self, model: nn.Module, probe: LabelledSet, analytic: bool) -> None:
        self._labels = probe.y

    def share(self, x: Any) -> None:  # computed on rank 0 alone (never shared)
        return None

    def measure(self, step: int, x: Any) -> Tuple[Fields, None]:
        """The estimated record fields of the kernel on ``x`` now (no kernel is formed)."""
        op = NTKOperator(self.model, x, **self._options)
        trace = estimate.trace(op, self.matvecs, seed=self.seed)
        norm = estimate.frobenius(op, self.matvecs, seed=self.seed + 1)
        if not all(math.isfinite(v) for v in (*trace, *norm)):
            return self._nonfinite(step, [], "its estimated trace or Frobenius norm is not finite"), None
        fields = {records.FINITE: True, records.EFFECTIVE_RANK: None, records.LAYER_SHARE: None}
        fields.update(_with_error(records.TRACE, trace))
        fields.update(_with_error(records.FROBENIUS, norm))
        fields.update(self._spectrum(op))
        fields.update(self._alignment(op, norm))
        fields.update(self._drift(step, op, norm))
        current = _Measured(step, op, norm)
        if step == 0:
            self.initial_operator = current
        self._previous = current
        return fields, None

    def _spectrum(self, op: NTKOperator) -> Fields:
        """The top eigenvalues by block Lanczos and their residuals."""
        n = op.shape[0]
        k = min(TOP_EIGENVALUES, n - 1)
        if k < 1:
            return dict.fromkeys((records.TOP_EIGENVALUES, records.error(records.TOP_EIGENVALUES)))
        result = eigsh(op, k, tol=EIGSH_TOL, max_iter=min(n, 10 * k), seed=self.seed)
        return {records.TOP_EIGENVALUES: result.eigenvalues.tolist(),
                records.error(records.TOP_EIGENVALUES): result.residuals.tolist()}

    def _alignment(self, op: NTKOperator, norm: Estimate) -> Fields:
        """Centred kernel-target alignment from one exact product with ``[H Y, 1]`` and the
        estimated ``|K|_F`` (module docstring)."""
        if self._targets is None:
            outputs = None if op.layout.sums_outputs else op.num_outputs
            self._targets = metrics.centred_targets(self._labels.cpu(), op.n1, outputs)
        targets = self._targets
        product = (op @ targets.columns()).to("cpu", torch.float64)
        inner, squared = metrics.centred_alignment_terms(product, targets, norm.value)
        target_norm = targets.norm
        if target_norm == 0 or squared <= 0:
            return dict.fromkeys((records.TARGET_ALIGNMENT, records.error(records.TARGET_ALIGNMENT)))
        value = inner / (math.sqrt(squared) * target_norm)
        squared_error = 2 * norm.value * norm.error
        return _with_error(records.TARGET_ALIGNMENT, Estimate(value, abs(value) * squared_error / (2 * squared)))

    def _drift(self, step: int, op: NTKOperator, norm: Estimate) -> Fields:
        """Relative change and kernel distance from step 0, velocity from the previous
        measurement, from the estimated distances ``|K - K0|_F`` and ``|K - Kp|_F``."""
        fields: Fields = dict.fromkeys(records.DRIFT + tuple(map(records.error, records.DRIFT)))
        if step == 0:
            for name in (records.RELATIVE_CHANGE, records.KERNEL_DISTANCE):
                fields.update(_with_error(name, Estimate(0.0, 0.0)))
        elif self.initial_operator is not None:
            initial = self.initial_operator
            distance = estimate.distance(op, initial.operator, self.matvecs, seed=self.seed + 2)
            fields.update(_with_error(records.RELATIVE_CHANGE, _relative_change(distance, initial.norm)))
            fields.update(_with_error(records.KERNEL_DISTANCE, _kernel_distance(distance, norm, initial.norm)))
        previous = self._previous
        if previous is not None and step > previous.step:
            distance = estimate.distance(op, previous.operator, self.matvecs, seed=self.seed + 3)
            moved = _kernel_distance(distance, norm, previous.norm)
            steps = step - previous.step
            velocity = None if moved is None else Estimate(moved.value / steps, moved.error / steps)
            fields.update(_with_error(records.VELOCITY, velocity))
        return fields


def _with_error(name: str, value: Optional[Estimate]) -> Fields:
    """``{name: value, name_error: error}`` (both None for an undefined value)."""
    if value is None:
        return {name: None, records.error(name): None}
    return {name: value.value, records.error(name): value.error}


def _relative_change(distance: Estimate, reference: Estimate) -> Optional[Estimate]:
    """``D / F0`` and its first-order error."""
    if reference.value == 0:
        return None
    value = distance.value / reference.value
    error = math.hypot(distance.error / reference.value, value * reference.error / reference.value)
    return Estimate(value, error)


def _kernel_distance(distance: Estimate, a: Estimate, b: Estimate) -> Optional[Estimate]:
    """``1 - <A, B> / (|A| |B|) = (D^2 - (F - G)^2) / (2 F G)`` for ``D = |A - B|_F``,
    ``F = |A|_F``, ``G = |B|_F``, and its first-order error (independent estimates)."""
    F, G = a.value, b.value
    if F == 0 or G == 0:
        return None
    D = distance.value
    squared, squared_error = D ** 2, (2 * D * distance.error if D > 0 else distance.error ** 2)
    value = (squared - (F - G) ** 2) / (2 * F * G)
    d_squared = 1 / (2 * F * G)
    d_F = -squared / (2 * F ** 2 * G) - 1 / (2 * G) + G / (2 * F ** 2)
    d_G = -squared / (2 * F * G ** 2) - 1 / (2 * F) + F / (2 * G ** 2)
    error = math.sqrt((d_squared * squared_error) ** 2 + (d_F * a.error) ** 2 + (d_G * b.error) ** 2)
    return Estimate(value, error)
