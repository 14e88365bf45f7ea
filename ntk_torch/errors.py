"""Exceptions raised by ntk_torch."""

from typing import Optional, Sequence


class NonFiniteKernelError(FloatingPointError):
    """A kernel contains NaN or infinite entries.

    Attributes:
        groups: the parameter groups (module paths) whose contribution is non-finite.
        inputs: the input at fault (e.g. ``"x1"``, ``"x2[0]"``) when an input holds NaN or
            inf entries, which is then the cause named; None when the inputs are finite.
    """

    def __init__(self, groups: Sequence[str], inputs: Optional[str] = None):
        self.groups = tuple(groups)
        self.inputs = inputs
        listed = ", ".join(repr(g) for g in self.groups)
        if inputs is not None:
            message = (
                f"the kernel is not finite (NaN or inf) because the input {inputs} holds NaN or "
                f"inf entries; clean the inputs (the parameter groups affected: {listed})"
            )
        else:
            message = (
                f"the kernel is not finite (NaN or inf) in the contribution of parameter "
                f"group {listed}; check the model's outputs and parameters for NaN/inf"
            )
        super().__init__(message)


class DistributedKernelError(RuntimeError):
    """A distributed kernel could not be computed: another rank failed (the message names
    it and its error), the ranks' requests differ, or a collective did not complete within
    the process group's timeout."""


class KernelStoreError(ValueError):
    """An out-of-core kernel's progress record is refused: it was made for another
    request, or it is corrupt. Nothing is written; the message says what differs."""
