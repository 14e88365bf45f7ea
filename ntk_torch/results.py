"""Machine-readable results of the ``ntk-torch`` commands (``--json``): plain dicts that
:func:`dumps` writes as strict JSON (non-finite numbers as ``null``).

* ``run``: the run's ``summary.json`` (:mod:`ntk_torch.runs.summary`: final values,
  configuration, versions) with ``figures`` and ``report`` added;
* ``sweep``: the swept parameter, per value its runs, the seed mean **and each seed's
  value** with their standard deviation, the fitted log-log slopes with the number of
  points each was fitted to (a slope from fewer than three points is flagged);
* ``sweep --predict-only``: the ranking;
* ``predict``: the predicted curve, the largest stable learning rate and the forecast's
  settings.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import records
from .runs import load_run
from .runs.summary import strict_json, versions

__all__ = ["MIN_SLOPE_POINTS", "dumps", "forecast_result", "ranking_result", "run_result", "seed_spread",
           "sweep_result"]

MIN_SLOPE_POINTS = 3
"""Fewer distinct swept values than this leave a fitted slope without any check of the
power law (two points always lie on a line): such a slope is reported with a caveat."""


def dumps(payload: Any) -> str:
    """``payload`` as indented strict JSON (paths as strings)."""
    return strict_json(payload, default=str, indent=2)


def run_result(run_dir: Path, figures: Sequence[Path] = ()) -> Dict[str, Any]:
    """The ``summary.json`` of the run in ``run_dir`` with its ``figures`` (and report) listed."""
    summary = load_run(run_dir).summary or {"run": str(run_dir)}
    return {**summary, "files": [str(path) for path in figures]}


def seed_spread(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """``{"seeds": [...], "mean", "std", "min", "max"}`` of one field's per-seed values
    (None or NaN left out of the statistics; ``std`` the sample standard deviation, None
    with fewer than two finite values)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {
        "seeds": list(values),
        "mean": statistics.fmean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) >= 2 else None,
        "min": min(finite) if finite else None,
        "max": max(finite) if finite else None,
    }


def _compared(run: Any, field: str) -> Optional[float]:
    """The value of ``field`` a sweep compares: the last finite one, but for the distance
    from the infinite-width NTK, taken at step 0 (the first)."""
    found = run.first_finite(field) if field == records.ANALYTIC_DISTANCE else run.last_finite(field)
    return None if found is None else found[0]


def point_spreads(point: Any) -> Dict[str, Dict[str, Any]]:
    """Each swept field's :func:`seed_spread` over the runs of one sweep point."""
    return {field: seed_spread([_compared(run, field) for run in point.runs]) for field in point.means}


def slope_points(result: Any, field: str) -> int:
    """The distinct positive swept values a slope of ``field`` was fitted through."""
    values = {p.value for p in result.points
              if isinstance(p.value, (int, float)) and not isinstance(p.value, bool) and p.value > 0
              and p.means[field] > 0}
    return len(values)


def sweep_result(result: Any) -> Dict[str, Any]:
    """A finished sweep (``sweeps.SweepResult``) as a dict (see the module docstring)."""
    points: List[Dict[str, Any]] = [
        {"value": point.value, "runs": [str(run.path) for run in point.runs], "means": dict(point.means),
         "spread": point_spreads(point)}
        for point in result.points
    ]
    slopes = {}
    for field, slope in result.slopes.items():
        count = slope_points(result, field)
        slopes[field] = {"slope": slope, "points": count, "reliable": count >= MIN_SLOPE_POINTS}
    return {"parameter": result.parameter, "points": points, "slopes": slopes,
            "figure": None if result.figure is None else str(result.figure), "versions": versions()}


def ranking_result(ranking: Any) -> Dict[str, Any]:
    """A ``sweeps.Ranking`` as a dict: the values best first with their scores."""
    return {
        "parameter": ranking.parameter, "metric": ranking.metric, "steps": ranking.steps, "seeds": ranking.seeds,
        "values": [{"value": v.value, "score": v.score, "predicted": dict(v.predicted),
                    "max_learning_rate": v.max_learning_rate} for v in ranking.values],
        "versions": versions(),
    }


def forecast_result(name: str, forecast: Any, figure: Path) -> Dict[str, Any]:
    """An ``experiment.Forecast`` as a dict: the curve (steps and one list per field)."""
    fields = sorted({key for row in forecast.rows for key in row})
    return {
        "config": name, "steps": list(forecast.steps),
        "predicted": {key: [row.get(key) for row in forecast.rows] for key in fields},
        "max_learning_rate": forecast.max_learning_rate, "forecast": dict(forecast.description),
        "figure": str(figure), "versions": versions(),
    }
