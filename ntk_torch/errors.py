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


class UnsupportedModelError(RuntimeError):
    """A kernel engine cannot run this model.

    The message names the layer and the operation that fail (for instance
    ``torch.func.vmap`` on data-dependent control flow, an LSTM or
    ``torch.utils.checkpoint``) and an engine that can: ``method="loop"`` (plain autograd,
    one example at a time) or ``method="auto"``, which falls back to it.
    """
