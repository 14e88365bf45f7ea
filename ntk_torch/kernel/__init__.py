"""eNTK engines behind one entry point, :func:`empirical_ntk`."""

from .api import METHODS, PerLayerKernels, choose_method, empirical_ntk
from .engine import MODES

__all__ = ["MODES", "METHODS", "PerLayerKernels", "choose_method", "empirical_ntk"]
