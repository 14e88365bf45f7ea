"""Sweeps: a config run over the values of one of its keys, or ranked by forecast alone.

:func:`sweep_plan` expands a config's ``sweep`` section into one config per value and
seed; :func:`sweep` trains them all (:func:`ntk_torch.experiment.run`) and compares kernel
drift and linearisation gap against the swept value (fitted log-log slopes, ``sweep.png``);
:func:`rank_by_forecast` ranks the values by their forecasts without training
(:func:`ntk_torch.experiment.forecast`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import records
from ._options import check_bool
from .config import ConfigError, RunConfig, check_run_name, set_by_path
from .experiment import forecast, run
from .runs import Run


SWEEP_FIELDS: Tuple[str, ...] = (records.RELATIVE_CHANGE, records.gap(records.TRAIN))
"""What a sweep compares across values: each run's last finite value of these fields."""
ANALYTIC_FIELD = records.ANALYTIC_DISTANCE
"""With ``track.analytic_reference: true`` also compared: each run's distance of the kernel
at step 0 from the infinite-width NTK, ``|K0 - K_inf|_F / |K_inf|_F`` (:mod:`ntk_torch.analytic`),
which shrinks as ``width^(-1/2)`` for an NTK-parametrised MLP."""
SWEEP_FIGURE = "sweep"


@dataclass
class SweepPlan:
    """A config's sweep section expanded into the configs to run.

    Attributes:
        parameter: the swept dotted key, e.g. ``model.options.width``.
        values: ``(value, [one config per seed])`` for each swept value, in the config's
            order; the configs are named ``<name>-<key><value>`` (``-seed<seed>`` added
            when there are several seeds).
    """

    parameter: str
    values: List[Tuple[Any, List[RunConfig]]]

    @property
    def seeds(self) -> int:
        """How many runs (seeds) each value has."""
        return len(self.values[0][1])


def sweep_plan(config: RunConfig) -> SweepPlan:
    """The :class:`SweepPlan` of ``config``'s sweep section: the swept value set on a
    copy of the config, and seeds ``seed, seed + 1, ...`` for ``sweep.seeds`` repeats.

    Raises:
        ConfigError: the config has no sweep section, or a swept value is invalid there.
    """
    if config.sweep is None:
        raise ConfigError(f"config {config.name!r} has no sweep section (sweep: {{parameter: ..., values: [...]}})")
    parameter, seeds = config.sweep.parameter, config.sweep.seeds
    values, names = [], {}
    for value in config.sweep.values:
        swept = set_by_path(config, parameter, value, source=f"sweep {parameter}={value}")
        name = f"{config.name}-{parameter.rsplit('.', 1)[-1]}{value}"
        repeats = []
        for offset in range(seeds):
            repeat = set_by_path(swept, "seed", config.seed + offset) if offset else swept
            repeat.name = check_run_name(
                name if seeds == 1 else f"{name}-seed{config.seed + offset}", f"sweep value {value!r}: the run name"
            )
            if repeat.name in names:
                raise ConfigError(
                    f"sweep.values {names[repeat.name]!r} and {value!r} give two runs the same name {repeat.name!r}"
                )
            names[repeat.name] = value
            repeats.append(repeat)
        values.append((value, repeats))
    return SweepPlan(parameter, values)


def _mean_finite(values: Iterable[Optional[float]]) -> float:
    """The mean of the finite numbers among ``values`` (NaN when there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class SweepPoint:
    """One swept value after training.

    Attributes:
        value: the swept value.
        runs: its runs, one per seed.
        means: for each of :data:`SWEEP_FIELDS`, the mean over the runs of the field's
            last finite value (NaN when no run has one); with ``track.analytic_reference``,
            also :data:`ANALYTIC_FIELD`, the mean of its value at step 0.
    """

    value: Any
    runs: List[Run]
    means: Dict[str, float]


@dataclass
class SweepResult:
    """A finished sweep.

    Attributes:
        parameter: the swept dotted key.
        points: one :class:`SweepPoint` per value, in the plan's order.
        slopes: for each of :data:`SWEEP_FIELDS` with positive means at two or more
            distinct positive swept values, the fitted log-log slope against the value
            (``plots.fit_loglog_slope``).
        figure: ``sweep.png`` (an SVG beside it) of the points at positive swept values,
            or None when fewer than two distinct ones are (no log axis to draw against).
    """

    parameter: str
    points: List[SweepPoint]
    slopes: Dict[str, float]
    figure: Optional[Path]


def sweep(
    plan: SweepPlan,
    out_dir: Union[str, Path],
    *,
    force: bool = False,
    progress: bool = True,
    on_point: Optional[Callable[[SweepPoint], None]] = None,
    allow_imports: Sequence[str] = (),
) -> SweepResult:
    """Train every config of ``plan`` (:func:`run`), each into ``out_dir/<config name>``,
    and compare the values; ``on_point`` is called after each value's runs.

    Returns:
        The :class:`SweepResult`; the figure, when there is one, is written to ``out_dir``.
    """
    check_bool("force", force)
    check_bool("progress", progress)
    out_dir = Path(out_dir)
    points = []
    analytic = plan.values[0][1][0].track.analytic_reference
    for value, repeats in plan.values:
        runs = [run(config, _inside(out_dir, config.name), force=force, progress=progress, allow_imports=allow_imports)
                for config in repeats]
        means = {field: _mean_finite(_last_finite(r, field) for r in runs) for field in SWEEP_FIELDS}
        if analytic:
            means[ANALYTIC_FIELD] = _mean_finite(_first_finite(r, ANALYTIC_FIELD) for r in runs)
        points.append(SweepPoint(value, runs, means))
        if on_point is not None:
            on_point(points[-1])
    on_log_axis = [point for point in points if _positive(point.value)]
    if len({point.value for point in on_log_axis}) < 2:
        return SweepResult(plan.parameter, points, {}, None)
    figure = _save_sweep_figure(on_log_axis, plan.parameter, out_dir / SWEEP_FIGURE)
    return SweepResult(plan.parameter, points, _loglog_slopes(on_log_axis), figure)


def _inside(out_dir: Path, name: str) -> Path:
    """``out_dir / name``, checked to stay inside ``out_dir`` (a plain name does)."""
    child = (out_dir / check_run_name(name, "the run name")).resolve()
    if child.parent != out_dir.resolve():
        raise ConfigError(f"the run name {name!r} leads out of the output directory {out_dir}")
    return child


def _last_finite(trained: Run, field: str) -> Optional[float]:
    last = trained.last_finite(field)
    return None if last is None else last[0]


def _first_finite(trained: Run, field: str) -> Optional[float]:
    first = trained.first_finite(field)
    return None if first is None else first[0]


def _positive(value: Any) -> bool:
    """Whether ``value`` is a finite number above 0 (not a bool), one a log axis can show."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _loglog_slopes(points: List[SweepPoint]) -> Dict[str, float]:
    """``{field: slope}`` of the power law fitted to each field against the swept value
    over the points where the field is positive; fields with under two such values left out."""
    from .plots import fit_loglog_slope

    slopes = {}
    for field in points[0].means:
        pairs = [(p.value, p.means[field]) for p in points if _positive(p.means[field])]
        if len({x for x, _ in pairs}) >= 2:
            slopes[field] = fit_loglog_slope(*zip(*pairs)).slope
    return slopes


def _save_sweep_figure(points: List[SweepPoint], parameter: str, stem: Path) -> Path:
    """Draw the lazy-regime picture (``plots.width_sweep``) of ``points`` against the
    swept value; return the PNG's path (an SVG is written beside it)."""
    from matplotlib.figure import Figure  # matplotlib is imported only when a figure is drawn

    from . import plots

    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = figure.subplots()
    plots.width_sweep([(p.value, *(p.means[field] for field in SWEEP_FIELDS), p.means.get(ANALYTIC_FIELD))
                       for p in points], ax)
    ax.set_xlabel(parameter)
    for fmt in ("png", "svg"):
        plots.save_figure(figure, stem.with_suffix(f".{fmt}"))
    return stem.with_suffix(".png")


@dataclass
class RankedValue:
    """One swept value as its forecast sees it, before training.

    Attributes:
        value: the swept value.
        score: the ranking metric at the horizon, mean over the seeds.
        predicted: the forecast's fields at the horizon, each the mean over the seeds
            (None where the forecast has no such field).
        max_learning_rate: the mean largest stable learning rate (NaN when unknown).
    """

    value: Any
    score: float
    predicted: Dict[str, Optional[float]]
    max_learning_rate: float


@dataclass
class Ranking:
    """The sweep values ranked by what the kernel at initialisation predicts.

    Attributes:
        parameter: the swept dotted key.
        metric: the field ranked by: ``predicted_test_accuracy`` (highest first) when
            every value has one, else ``predicted_test_loss`` (lowest first).
        steps: the horizon of the forecasts (``train.steps`` of the first config).
        seeds: the forecasts averaged per value.
        values: the :class:`RankedValue` of each value, best first.
    """

    parameter: str
    metric: str
    steps: int
    seeds: int
    values: List[RankedValue]


def rank_by_forecast(plan: SweepPlan, *, allow_imports: Sequence[str] = ()) -> Ranking:
    """Forecast every config of ``plan`` at its ``train.steps`` (:func:`forecast`, no
    training) and rank the values by predicted test accuracy, or loss without classes.

    Raises:
        ConfigError: a config's optimizer cannot be modelled (only SGD can).
    """
    forecasts = [(value, _mean_forecast(repeats, allow_imports)) for value, repeats in plan.values]
    accuracy = records.predicted(records.TEST, "accuracy")
    by_accuracy = all(predicted.get(accuracy) is not None for _, (predicted, _) in forecasts)
    metric = accuracy if by_accuracy else records.predicted(records.TEST, "loss")
    ranked = [
        RankedValue(value, _nan_if_none(predicted.get(metric)), predicted, max_lr)
        for value, (predicted, max_lr) in forecasts
    ]
    ranked.sort(key=lambda item: -item.score if by_accuracy else item.score)
    return Ranking(plan.parameter, metric, plan.values[0][1][0].train.steps, plan.seeds, ranked)


def _mean_forecast(
    configs: List[RunConfig], allow_imports: Sequence[str]
) -> Tuple[Dict[str, Optional[float]], float]:
    """The forecast's fields at ``train.steps`` and its largest stable learning rate,
    each the mean over ``configs`` (the seeds of one swept value)."""
    forecasts = [forecast(config, steps=[config.train.steps], allow_imports=allow_imports) for config in configs]
    rows = [f.rows[-1] for f in forecasts]
    predicted = {
        name: _mean_finite(row[name] for row in rows) if rows[0].get(name) is not None else None for name in rows[0]
    }
    return predicted, _mean_finite(f.max_learning_rate for f in forecasts)


def _nan_if_none(value: Optional[float]) -> float:
    return math.nan if value is None else value


