"""Figures of a run directory: kernel drift, spectrum, layer shares, predicted vs actual.

Every function reads a ``Run`` (or a run directory's path) and draws with matplotlib's
object-oriented API, never pyplot's global state: pass an ``Axes`` to draw into a figure
of your own, or leave ``ax=None`` and a new ``matplotlib.figure.Figure`` is created (it
needs no GUI backend and is freed like any Python object)::

    run = ntk.load_run("runs/exp")
    ax = plots.drift(run)                      # a new figure: ax.figure
    plots.drift([run_a, run_b], ax=my_ax)      # overlay two runs
    plots.save_all(run, "runs/exp/figures")    # every figure the run's data supports

Conventions shared by the time-series figures:

* x is the optimizer step, on a ``symlog`` axis by default (``xscale="symlog"``): linear
  on [0, 1] and logarithmic beyond, so step 0 (the reference kernel) sits at the left
  edge and the early steps, where the kernel moves most, are not crushed together. Pass
  ``xscale="linear"``, or ``"log"`` (which leaves step 0 out: log 0 is undefined).
* A measurement whose value is missing (an older run, a non-finite kernel, a metric
  undefined at that step) is skipped and the line joins its neighbours; a panel whose
  data is missing altogether says so in its title instead of raising.
* Several runs are told apart by colour (``C0``, ``C1``, ...); several quantities of one
  run by line style.

The modules:

==================  ==================================================================
``series``          the probe kernel over training: drift, velocity, target alignment,
                    linearisation gap, top eigenvalues, per-layer shares
``predictions``     the kernel forecast against the network; the forecast made before
                    training
``kernels``         heatmaps of saved kernels (cosine similarity, sorted by class)
``sweep``           kernel change against width, with power-law fits
``selection``       a selection's predicted score against trained accuracy, read from
                    its ``selection.json`` (``ntk-torch select``)
``catalogue``       ``FIGURES`` (names, captions, availability), ``figures``,
                    ``overview``, ``compare``
``saving``          ``save_figure``, ``save_all``
``_axes``           what they share: run arguments, the step axis, legends, notes
==================  ==================================================================

Record fields are read by the names :mod:`ntk_torch.records` gives them, and saved
kernels' layouts by :mod:`ntk_torch.layout`.
"""

from .catalogue import FIGURES, FigureSpec, compare, figures, overview
from .kernels import class_order, display_kernel, kernel_cosine, kernel_heatmaps
from .predictions import describe_prediction, forecast_figure, predicted_vs_actual
from .saving import PNG_DPI, save_all, save_figure  # PNG_DPI: the report's images use it too
from .series import drift, eigenvalues, layer_share, linearisation_gap, target_alignment, velocity
from .sweep import PowerLawFit, fit_loglog_slope, width_sweep

__all__ = [
    "FIGURES",
    "FigureSpec",
    "PowerLawFit",
    "class_order",
    "compare",
    "describe_prediction",
    "display_kernel",
    "drift",
    "eigenvalues",
    "figures",
    "fit_loglog_slope",
    "forecast_figure",
    "kernel_cosine",
    "kernel_heatmaps",
    "layer_share",
    "linearisation_gap",
    "overview",
    "predicted_vs_actual",
    "save_all",
    "save_figure",
    "target_alignment",
    "velocity",
    "width_sweep",
]
