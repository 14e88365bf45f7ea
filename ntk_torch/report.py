"""One self-contained HTML page per run: summary table, figures, configuration, model.

``write_report(run)`` writes ``report.html`` into the run directory. The page needs
nothing but a browser: figures are embedded as base64 PNG ``data:`` URIs, the style sheet
is inline, there is no JavaScript and no link to the network. Every piece of text that
comes from the run (config values, model summaries, group names) is HTML-escaped.

``summary_table(run)`` gives the same summary as ``(name, value)`` string pairs, for
printing on a terminal (``ntk-torch run``/``report``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import plots, records
from .runs import Run, load_run

__all__ = ["REPORT_FILE", "format_value", "render_report", "summary_table", "write_report"]

PathLike = Union[str, "os.PathLike[str]"]

REPORT_FILE = "report.html"
"""The report's file name inside the run directory (``write_report``'s default)."""
SHOWN_PROBLEMS = 5
"""How many of ``Run.problems`` the summary lists (then how many more there are)."""


# --------------------------------------------------------------------------- summary


def format_value(value: Any) -> str:
    """A number as 4 significant digits (integers exactly), None as "—", else ``str``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return str(value)  # nan, inf, -inf
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def summary_table(run: Union[Run, PathLike]) -> List[Tuple[str, str]]:
    """The run at a glance, as ``(name, value)`` string pairs.

    Rows, each present only when the run has the data: status (and its reason), what
    ``load_run`` skipped or found suspicious (``Run.problems``), measurements and steps
    (saying so when the last one was measured at the end of training, ``final`` in its
    record), the final actual and predicted train/test loss and accuracy (the probe's when the run
    has no train loss), the linearisation gap, the final kernel drift (relative change,
    kernel distance), parameter distance, target alignment and effective rank (first →
    last), how the prediction was made (``meta["prediction"]``), and saved kernels. A
    "final" value is the last finite one; its step is added when that is not the run's
    last step (e.g. the last kernel was not finite).

    Example::

        for name, value in summary_table(run):
            print(f"{name:<32} {value}")
    """
    run = run if isinstance(run, Run) else load_run(run)
    last_step = int(run.steps[-1]) if len(run) else None
    rows: List[Tuple[str, str]] = [("status", run.status or "unknown (run not closed)")]
    if run.reason:
        rows.append(("reason", run.reason))
    if run.problems:
        shown = run.problems[:SHOWN_PROBLEMS]
        more = len(run.problems) - len(shown)
        rows.append(("read with problems", "; ".join(shown) + (f"; and {more} more" if more else "")))
    if last_step is None:
        rows.append(("measurements", "0"))
        return rows
    at_end = ", the last measured at the end of training" if run.records[-1].get(records.FINAL) else ""
    rows.append(("measurements", f"{len(run)} (steps {int(run.steps[0])}–{last_step}{at_end})"))

    def final(name: str, column: str) -> None:
        found = run.last_finite(column)
        if found is not None:
            value, step = found
            where = "" if step == last_step else f" (step {step})"
            rows.append((name, format_value(value) + where))

    train = records.TRAIN if run.last_finite(records.actual(records.TRAIN)) is not None else records.PROBE
    for metric in records.METRICS:
        final(f"final {train} {metric}", records.actual(train, metric))
        final(f"final train {metric} (predicted)", records.predicted(records.TRAIN, metric))
        final(f"final test {metric}", records.actual(records.TEST, metric))
        final(f"final test {metric} (predicted)", records.predicted(records.TEST, metric))
    for split in records.FORECAST_SPLITS:
        final(f"final linearisation gap ({split})", records.gap(split))
    final("final relative change of K", records.RELATIVE_CHANGE)
    final("final kernel distance from K₀", records.KERNEL_DISTANCE)
    final("final parameter distance", records.PARAM_DISTANCE)
    for name, column in (("target alignment", records.TARGET_ALIGNMENT), ("effective rank", records.EFFECTIVE_RANK)):
        first, last = run.first_finite(column), run.last_finite(column)
        if last is not None:
            rows.append((f"{name} (first → last)", f"{format_value(first[0])} → {format_value(last[0])}"))

    finite = run.metrics.get(records.FINITE)
    if finite is not None and finite.dtype != object and (finite == 0).any():
        rows.append(("non-finite kernels", f"{int((finite == 0).sum())} measurement(s)"))
    prediction = run.meta.get("prediction")
    if isinstance(prediction, Mapping):
        rows.append(("prediction", plots.describe_prediction(prediction)))
    saved = run.kernel_steps
    if len(saved):
        rows.append(("saved kernels", f"{len(saved)} (steps {', '.join(map(str, saved.tolist()))})"))
    return rows


# --------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
h3 { font-size: 1.05rem; margin-bottom: 0.3rem; }
table { border-collapse: collapse; margin: 0.4rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td table { margin: 0; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #555; }
pre { background: #f7f7f7; padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; }
nav a { margin-right: 1rem; }
.muted { color: #666; font-size: 0.9rem; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _as_mapping(config: Any) -> Mapping[str, Any]:
    """A config given as a mapping, a dataclass or an object with ``to_dict()``."""
    if isinstance(config, Mapping):
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"config must be a dict, a dataclass or have to_dict(), got {type(config).__name__}")


def _value_html(value: Any) -> str:
    """A JSON-like value as escaped HTML: dicts as nested tables, long or multi-line
    strings as ``<pre>``, lists of scalars inline."""
    if isinstance(value, Mapping):
        return _mapping_table(value) if value else "<span class=\"muted\">(empty)</span>"
    if isinstance(value, str) and ("\n" in value or len(value) > 120):
        return f"<pre>{_e(value)}</pre>"
    if isinstance(value, (list, tuple)):
        if any(isinstance(item, (Mapping, list, tuple)) for item in value):
            return "<br>".join(_value_html(item) for item in value)
        text = ", ".join(format_value(item) for item in value)
        return _e(f"[{text}]") if len(text) <= 200 else f"<pre>{_e(f'[{text}]')}</pre>"
    return _e(format_value(value))


def _mapping_table(mapping: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th scope=\"row\">{_e(key)}</th><td>{_value_html(value)}</td></tr>"
                   for key, value in mapping.items())
    return f"<table>{rows}</table>"


def _pairs_table(pairs: Iterable[Tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th scope=\"row\">{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in pairs)
    return f"<table>{rows}</table>"


def _figure_pngs(run: Run, images: Mapping[str, bytes]) -> List[Tuple[plots.FigureSpec, bytes]]:
    """``(spec, PNG)`` of every figure the run supports, in ``plots.FIGURES`` order: the
    PNGs given in ``images`` (by figure name) as they are, the others drawn now."""
    given = {spec.name: images[spec.name] for spec in plots.FIGURES if spec.name in images and spec.available(run)}
    pngs = {**{spec.name: _png(figure) for spec, figure in plots.figures(run, skip=given)}, **given}
    return [(spec, pngs[spec.name]) for spec in plots.FIGURES if spec.name in pngs]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=plots.PNG_DPI)
    return buffer.getvalue()


def _figures_html(run: Run, images: Mapping[str, bytes]) -> str:
    """The ``<figure>`` elements of every figure the run supports, each with its caption."""
    parts = []
    for spec, png in _figure_pngs(run, images):
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure id=\"fig-{_e(spec.name)}\">"
            f"<img src=\"{uri}\" alt=\"{_e(spec.title)}\">"
            f"<figcaption><strong>{_e(spec.title)}.</strong> {_e(spec.caption)}</figcaption></figure>"
        )
    if not parts:
        parts.append("<p class=\"muted\">This run has no data to plot.</p>")
    return "\n".join(parts)


def _configuration_html(meta: Mapping[str, Any], config: Any) -> str:
    """The tracker's configuration, the run's (``config``) and the prediction, probe and
    test set descriptions (index and label lists as their lengths)."""
    parts = []
    if isinstance(meta.get("config"), Mapping):
        parts.append(f"<h3>Tracker</h3>{_mapping_table(meta['config'])}")
    if config is not None:
        parts.append(f"<h3>Run configuration</h3>{_mapping_table(_as_mapping(config))}")
    for key, heading in (("prediction", "Prediction"), ("probe", "Probe set"), ("test", "Test set")):
        value = meta.get(key)
        if isinstance(value, Mapping):
            shown = {k: v for k, v in value.items() if k not in ("indices", "labels")}
            for k in ("indices", "labels"):
                if isinstance(value.get(k), list):
                    shown[k] = f"{len(value[k])} entries"
            parts.append(f"<h3>{_e(heading)}</h3>{_mapping_table(shown)}")
    if not parts:
        parts.append("<p class=\"muted\">No configuration recorded.</p>")
    return "\n".join(parts)


def _model_html(meta: Mapping[str, Any], summary: Optional[Mapping[str, Any]]) -> str:
    """The model's description in ``meta["model"]`` and the given ``summary``."""
    parts = []
    if isinstance(meta.get("model"), Mapping):
        parts.append(_mapping_table(meta["model"]))
    if summary is not None:
        if not isinstance(summary, Mapping):
            raise TypeError(f"summary must be a dict (e.g. ntk_torch.models.summary(model)), got {type(summary).__name__}")
        parts.append(f"<h3>Model summary</h3>{_mapping_table(summary)}")
    if not parts:
        parts.append("<p class=\"muted\">No model description recorded.</p>")
    return "\n".join(parts)


def render_report(
    run: Union[Run, PathLike],
    *,
    config: Any = None,
    summary: Optional[Mapping[str, Any]] = None,
    images: Optional[Mapping[str, bytes]] = None,
) -> str:
    """The report page of ``run`` as an HTML5 string; see ``write_report``."""
    run = run if isinstance(run, Run) else load_run(run)
    meta = run.meta if isinstance(run.meta, Mapping) else {}
    title = f"ntk_torch report: {run.path.name or run.path}"
    created = meta.get("created")
    when = ""
    if isinstance(created, (int, float)):
        when = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime(" · created %Y-%m-%d %H:%M UTC")

    sections = [
        ("summary", "Summary", _pairs_table(summary_table(run))),
        ("figures", "Figures", _figures_html(run, images or {})),
        ("config", "Configuration", _configuration_html(meta, config)),
        ("model", "Model", _model_html(meta, summary)),
    ]

    versions = meta.get("versions")
    footer = "Generated by ntk_torch"
    if isinstance(versions, Mapping) and versions:
        footer += " · recorded with " + ", ".join(f"{k} {v}" for k, v in versions.items())

    nav = " ".join(f"<a href=\"#{key}\">{_e(heading)}</a>" for key, heading, _ in sections)
    body = "\n".join(f"<section id=\"{key}\">\n<h2>{_e(heading)}</h2>\n{content}\n</section>"
                     for key, heading, content in sections)
    return (
        "<!DOCTYPE html>\n"
        "<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<header><h1>{_e(title)}</h1>\n"
        f"<p class=\"muted\">{_e(str(run.path))}{_e(when)}</p>\n<nav>{nav}</nav></header>\n"
        f"<main>\n{body}\n</main>\n"
        f"<footer><p class=\"muted\">{_e(footer)}</p></footer>\n"
        "</body>\n</html>\n"
    )


def write_report(
    run_or_path: Union[Run, PathLike],
    out_path: Optional[PathLike] = None,
    *,
    config: Any = None,
    summary: Optional[Mapping[str, Any]] = None,
    images: Optional[Mapping[str, bytes]] = None,
) -> Path:
    """Write a self-contained HTML report of a run.

    The page has the summary table (``summary_table``), every figure the run's data
    supports (``plots.figures``, as embedded PNG), the configuration (the tracker's
    ``meta["config"]``, the given ``config``, the prediction, probe and test set
    descriptions) and the model (``meta["model"]`` and the given ``summary``). No
    JavaScript, no external resources; all text is HTML-escaped.

    Args:
        run_or_path: a ``Run`` or a run directory.
        out_path: the file to write; default ``<run directory>/report.html``. Parent
            directories are created.
        config: the run's configuration, a dict (nested dicts are shown as nested
            tables), a dataclass (e.g. ``ntk_torch.config.RunConfig``) or an object with
            ``to_dict()``.
        summary: a model description dict, e.g. ``ntk_torch.models.summary(model)``,
            shown under the model section.
        images: PNGs of figures already rendered from this run, by figure name (the
            ``<name>.png`` files ``plots.save_all`` writes): embedded as they are rather
            than drawn again (``ntk-torch run`` draws each figure once).

    Returns:
        The path written.
    """
    run = run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)
    page = render_report(run, config=config, summary=summary, images=images)
    out_path = Path(out_path) if out_path is not None else run.path / REPORT_FILE
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(f".{out_path.name}.tmp")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, out_path)
    return out_path
