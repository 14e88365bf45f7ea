"""eNTK engines behind one configured kernel function, :class:`NTK` (and :func:`empirical_ntk`)."""

from ..layout import KERNEL_MODES, MODES
from .api import NTK, PerLayerKernels, empirical_ntk, explain
from .explain import StructuredReport
from .gathering import KernelShard, KernelTile
from .operator import NTKOperator
from .planning import METHODS, choose_method

__all__ = [
    "KERNEL_MODES",
    "MODES",
    "METHODS",
    "KernelShard",
    "KernelTile",
    "NTK",
    "NTKOperator",
    "PerLayerKernels",
    "StructuredReport",
    "choose_method",
    "empirical_ntk",
    "explain",
]
