"""Figures to files: one figure in the format its suffix names, or every figure of a run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import matplotlib
from matplotlib.figure import Figure

from ._axes import PathLike, RunLike, as_run
from .catalogue import figures, overview

__all__ = ["PNG_DPI", "save_all", "save_figure"]

PNG_DPI = 120
"""The resolution of PNG figures, in dots per inch (files and the report's images)."""
SVG_SALT = "ntk_torch"
"""The salt of SVG element ids (clip paths, markers): matplotlib draws random ones otherwise."""


def _check_formats(formats: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    supported = Figure().canvas.get_supported_filetypes()
    bad = [f for f in formats if f not in supported]
    if bad or not formats:
        raise ValueError(
            f"formats must be a non-empty selection of {', '.join(sorted(supported))}; got {list(formats)}"
        )
    return formats


def save_figure(figure: Figure, path: PathLike) -> Path:
    """Write ``figure`` to ``path`` in the format its suffix names (PNG at 120 dpi; SVG
    and PDF without a creation date, and SVG's element ids from a fixed salt, so reruns
    give identical files)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    with matplotlib.rc_context({"svg.hashsalt": SVG_SALT}):
        figure.savefig(path, format=fmt, dpi=PNG_DPI, metadata=metadata)
    return path


def save_all(run: RunLike, out_dir: PathLike, formats: Union[str, Sequence[str]] = ("png", "svg")) -> List[Path]:
    """Write the overview and every figure the run's data supports to ``out_dir``.

    Files are ``overview.<fmt>`` and ``<spec.name>.<fmt>`` for each ``FIGURES`` entry
    available for this run (``drift.png``, ``predicted_vs_actual_loss.svg``, ...), in
    each format; ``out_dir`` is created if needed and existing files are replaced. What
    cannot be drawn (no overview when no record has data; a damaged kernel file) is left
    out with a ``RuntimeWarning``.

    Args:
        run: a ``Run`` or path.
        out_dir: the directory to write into.
        formats: file formats matplotlib can write, e.g. ``("png", "svg")``, ``"pdf"``.

    Returns:
        The paths written, overview first.
    """
    formats = _check_formats(formats)
    run = as_run(run)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = [(spec.name, figure) for spec, figure in figures(run)]
    try:
        drawn.insert(0, ("overview", overview(run)))
    except ValueError as error:  # no record has anything to draw
        warnings.warn(f"no overview: {error}", RuntimeWarning, stacklevel=2)
    return [path for name, figure in drawn for path in _save_formats(figure, out_dir / name, formats)]


def _save_formats(figure: Figure, stem: Path, formats: Sequence[str]) -> List[Path]:
    """``figure`` in each format, laid out once: after the first file its layout engine is
    switched off, so that the later formats keep the first one's positions instead of
    running the constrained layout again (the costliest part of drawing)."""
    paths = []
    for fmt in formats:
        paths.append(save_figure(figure, stem.with_name(f"{stem.name}.{fmt}")))
        figure.set_layout_engine("none")
    return paths
