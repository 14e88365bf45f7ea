"""eNTK engines behind one entry point, :func:`empirical_ntk`."""

from .analysis_cache import clear_cache
from .api import METHODS, PerLayerKernels, choose_method, empirical_ntk
from .engine import MODES
from .structured.explain import StructuredReport, explain

__all__ = [
    "MODES",
    "METHODS",
    "PerLayerKernels",
    "StructuredReport",
    "choose_method",
    "clear_cache",
    "empirical_ntk",
    "explain",
]
