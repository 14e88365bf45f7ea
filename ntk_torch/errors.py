"""Exceptions raised by ntk_torch."""

from typing import Sequence


class NonFiniteKernelError(FloatingPointError):
    """A kernel contains NaN or infinite entries.

    Attributes:
        groups: the parameter groups (module paths) whose contribution is non-finite.
    """

    def __init__(self, groups: Sequence[str]):
        self.groups = tuple(groups)
        listed = ", ".join(repr(g) for g in self.groups)
        super().__init__(
            f"the kernel is not finite (NaN or inf) in the contribution of parameter "
            f"group {listed}; check the model's outputs and parameters for NaN/inf"
        )


class DistributedKernelError(RuntimeError):
    """A distributed kernel could not be computed: another rank failed (the message names
    it and its error), the ranks' requests differ, or a collective did not complete within
    the process group's timeout."""


class KernelStoreError(ValueError):
    """An out-of-core kernel's progress record is refused: it was made for another
    request, or it is corrupt. Nothing is written; the message says what differs."""
