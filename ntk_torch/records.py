"""The record schema: the fields of one tracker measurement, named once.

The tracker writes one record (a JSON object, a line of a run's ``metrics.jsonl``) per
measurement; :mod:`ntk_torch.runs` reads them back, and the figures, the report and the
command line read the fields by these names. Every field but ``step`` may be missing (an
older run, a tracker without a test set or a forecast) or None (a metric undefined at that
step, a non-finite kernel).

==========================  ================================================================
field                       value
==========================  ================================================================
``step``                    the optimizer step of the measurement (int)
``time``                    Unix time of the measurement (s)
``measure_time``            seconds spent measuring
``kernel_time``             seconds of it spent forming the probe kernel (missing with
                            ``kernel="estimate"``, which never forms it, and for a kernel
                            that was not finite); the rest is the tracker's bookkeeping:
                            metrics, eigenvalues, losses, forecast
``finite``                  whether the probe kernel was finite
``nonfinite_groups``        the parameter groups at fault, when it was not
``trace``                   trace of the probe kernel's matrix
``frobenius``               its Frobenius norm
``top_eigenvalues``         its largest eigenvalues, descending (a list)
``effective_rank``          its effective rank (Roy & Vetterli 2007); None where only the
                            top of the spectrum is computed (``spectrum="top"``, or
                            ``"auto"`` for a large matrix such as a ``full`` kernel's)
``target_alignment``        centred kernel-target alignment with the probe labels
``relative_change``         ``|K - K0|_F / |K0|_F``, from step 0
``kernel_distance``         ``1 - <K, K0>_F / (|K|_F |K0|_F)`` (Fort et al. 2020)
``velocity``                kernel distance per step since the previous measurement
``analytic_distance``       ``|K - K_inf|_F / |K_inf|_F``, from the infinite-width NTK
                            (``analytic_reference=True``, an ntk_torch MLP in NTK parametrisation)
``layer_share``             ``{parameter group: trace(K_group) / trace(K)}``; None for a
                            sketched or estimated kernel (no per-layer kernels)
``{field}_error``           with ``kernel="estimate"``: the estimated standard deviation of
                            ``trace``, ``frobenius``, ``relative_change``,
                            ``kernel_distance``, ``velocity`` and ``target_alignment``
                            (Hutch++); for ``top_eigenvalues`` (also of a dense kernel whose
                            spectrum is the top one) a list of bounds, each Ritz value's
                            residual ``|K v - theta v|`` (an eigenvalue lies within it)
``param_distance``          ``|theta - theta_0| / |theta_0|``
``{split}_loss``            the network's loss on a split (``probe``, ``test``, ``train``)
``{split}_accuracy``        its accuracy, for class labels
``predicted_{split}_loss``  the forecast's loss on ``train`` or ``test``
``predicted_{split}_accuracy``  the forecast's accuracy
``linearisation_gap``       ``|train_loss - predicted_train_loss| / train_loss at step 0``
``test_linearisation_gap``  the same on the test set
``final``                   true on the record the tracker adds when it is detached or
                            closed, for a last optimizer step the schedule did not measure
==========================  ================================================================

With ``kernel="estimate"`` the probe kernel is never formed: ``effective_rank`` (the whole
spectrum) is None and the estimated fields carry their ``*_error``.

A run's dense forecast (the predicted fields at many more steps than the measurements, for
figures) uses the same ``predicted_*`` names, as columns (:func:`columns`).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

__all__ = [
    "ANALYTIC_DISTANCE",
    "DRIFT",
    "FORECAST_SPLITS",
    "KERNEL_STATISTICS",
    "PROBE",
    "TEST",
    "TRAIN",
    "EFFECTIVE_RANK",
    "ESTIMATED",
    "FINAL",
    "FINITE",
    "FROBENIUS",
    "KERNEL_DISTANCE",
    "KERNEL_TIME",
    "LAYER_SHARE",
    "MEASURE_TIME",
    "METRICS",
    "NONFINITE_GROUPS",
    "PARAM_DISTANCE",
    "RELATIVE_CHANGE",
    "SPLITS",
    "STEP",
    "TARGET_ALIGNMENT",
    "TIME",
    "TOP_EIGENVALUES",
    "TRACE",
    "VELOCITY",
    "actual",
    "columns",
    "error",
    "gap",
    "predicted",
]

STEP = "step"
TIME = "time"
MEASURE_TIME = "measure_time"
KERNEL_TIME = "kernel_time"
FINITE = "finite"
NONFINITE_GROUPS = "nonfinite_groups"
TRACE = "trace"
FROBENIUS = "frobenius"
TOP_EIGENVALUES = "top_eigenvalues"
EFFECTIVE_RANK = "effective_rank"
TARGET_ALIGNMENT = "target_alignment"
RELATIVE_CHANGE = "relative_change"
KERNEL_DISTANCE = "kernel_distance"
ANALYTIC_DISTANCE = "analytic_distance"
VELOCITY = "velocity"
LAYER_SHARE = "layer_share"
PARAM_DISTANCE = "param_distance"
FINAL = "final"

ESTIMATED: Tuple[str, ...] = (TRACE, FROBENIUS, TOP_EIGENVALUES, TARGET_ALIGNMENT, RELATIVE_CHANGE,
                              KERNEL_DISTANCE, VELOCITY)
"""The fields ``kernel="estimate"`` estimates, each with its :func:`error` field."""

KERNEL_STATISTICS: Tuple[str, ...] = (TRACE, FROBENIUS, TOP_EIGENVALUES, EFFECTIVE_RANK, TARGET_ALIGNMENT)
"""The fields computed from the probe kernel alone."""
DRIFT: Tuple[str, ...] = (RELATIVE_CHANGE, KERNEL_DISTANCE, VELOCITY)
"""The fields comparing the probe kernel with earlier ones."""

PROBE, TEST, TRAIN = "probe", "test", "train"
SPLITS: Tuple[str, ...] = (TRAIN, PROBE, TEST)
"""The data a loss is measured on: the forecast's training points, the probe, the test set."""
FORECAST_SPLITS: Tuple[str, ...] = (TRAIN, TEST)
"""The splits the forecast predicts."""
METRICS: Tuple[str, ...] = ("loss", "accuracy")
"""What is measured on a split."""


def actual(split: str, metric: str = "loss") -> str:
    """The network's ``metric`` on ``split``: ``"train_loss"``, ``"probe_accuracy"``, ..."""
    return f"{split}_{metric}"


def predicted(split: str, metric: str = "loss") -> str:
    """The forecast's ``metric`` on ``split``: ``"predicted_train_loss"``, ..."""
    return f"predicted_{split}_{metric}"


def gap(split: str) -> str:
    """The linearisation gap on ``split``: ``"linearisation_gap"`` (train) or
    ``"test_linearisation_gap"``."""
    return "linearisation_gap" if split == TRAIN else f"{split}_linearisation_gap"


def error(field: str) -> str:
    """The field of an estimate's error: ``"trace_error"``, ``"top_eigenvalues_error"``, ..."""
    return f"{field}_error"


def columns(
    by_step: Mapping[int, Mapping[str, Optional[float]]]
) -> Tuple[List[int], Dict[str, List[Optional[float]]]]:
    """``{step: {field: value}}`` as the sorted steps and, per field, its values at them
    (None where a step lacks the field)."""
    steps = sorted(by_step)
    names = dict.fromkeys(name for step in steps for name in by_step[step])
    return steps, {name: [by_step[step].get(name) for step in steps] for name in names}
