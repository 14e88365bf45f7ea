"""eNTK engines behind one configured kernel function, :class:`NTK` (and :func:`empirical_ntk`)."""

from ..layout import MODES
from .api import NTK, PerLayerKernels, empirical_ntk, explain
from .explain import StructuredReport
from .gathering import KernelShard, KernelTile
from .planning import METHODS, choose_method

__all__ = [
    "MODES",
    "METHODS",
    "KernelShard",
    "KernelTile",
    "NTK",
    "PerLayerKernels",
    "StructuredReport",
    "choose_method",
    "empirical_ntk",
    "explain",
]
