"""Exceptions and warnings raised by ntk_torch, and where a warning should point."""

import contextlib
import importlib.util
import os
import sys
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


class UnsupportedModelError(RuntimeError):
    """A kernel engine cannot run this model.

    The message names the layer and the operation that fail (for instance
    ``torch.func.vmap`` on data-dependent control flow, an LSTM or
    ``torch.utils.checkpoint``) and an engine that can: ``method="loop"`` (plain autograd,
    one example at a time) or ``method="auto"``, which falls back to it.
    """


class DistributedKernelError(RuntimeError):
    """A distributed kernel could not be computed: another rank failed (the message names
    it and its error), the ranks' requests differ, or a collective did not complete within
    the process group's timeout."""


class KernelStoreError(ValueError):
    """An out-of-core kernel's progress record is refused: it was made for another
    request, or it is corrupt. Nothing is written; the message says what differs."""


class ForecastWarning(UserWarning):
    """Something in the training set-up that the forecast does not model, and that may
    explain a gap between the predicted and the actual curve (BatchNorm in train mode,
    Dropout, a learning rate beyond the stable one, minibatches forecast as full batch,
    gradient clipping the tracker was not told about)."""


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn``, called from the function that calls this
    one, that points at the first frame outside ntk_torch and torch (and contextlib): the
    user's own line (``optimizer.step()``, ``with tracker.attach(...)``, ...)."""
    frame = sys._getframe(1)  # the function that will call warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_PATHS):
        frame = frame.f_back
        level += 1
    return level


def _package_dir(name: str) -> str:
    """Where package ``name`` lies, found without importing it (the command line imports no
    torch until a command needs it)."""
    spec = importlib.util.find_spec(name)
    return os.path.dirname(os.path.abspath(spec.origin)) + os.sep


_INTERNAL_PATHS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,  # ntk_torch
    _package_dir("torch"),  # the optimizer and module hooks
    contextlib.__file__,  # generator-based context managers
)
