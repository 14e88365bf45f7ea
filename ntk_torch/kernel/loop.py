"""Jacobian contraction without function transforms: per-example reverse passes in a loop.

The engine for models that ``torch.func.vmap`` cannot run (:mod:`.capability`): masks with
data-dependent control flow, ``nn.LSTM``/``nn.GRU``/``nn.RNN``, ``torch.utils.checkpoint``,
sparse embeddings. Each example of a block is evaluated *alone*, as a batch of one (as the
``vmap`` engines evaluate it, so every engine computes the same kernel also for a model
whose examples would interact in a batch), then one ``torch.autograd.grad`` per output
value gives the example's Jacobian row by row, with plain autograd: ``J[i, a] =
d f_a(x_i) / d theta``. The backward passes run while the parameters are still in the
module (:meth:`~ntk_torch.functional.FunctionalModel.with_output`), so checkpointed
segments recompute their forward with them; sparse gradients are made dense.

The Jacobians are then contracted exactly as by :class:`~.jacobian.JacobianEngine`
(Novak et al. 2022, "Jacobian contraction"). The cost is that engine's FLOPs, ``N O``
backward passes, without vectorisation: slower per example, exact wherever autograd is.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ..functional import FunctionalModel, Inputs, batch_size, slice_inputs
from .jacobian import JacobianEngine


class LoopEngine(JacobianEngine):
    """Kernel blocks by Jacobian contraction of per-example Jacobians from plain autograd."""

    name = "loop"

    def prepare_rows(self, x: Inputs) -> Dict[str, torch.Tensor]:
        """``{param name: J}`` with ``J`` of shape ``(n, O, numel)`` for the block ``x``."""
        return loop_jacobians(self.fmodel, x, self.num_outputs)

    prepare_cols = prepare_rows

    def block_bytes(self, n_rows: int, n_cols: int) -> int:
        profile = self.profile
        o, s = profile.num_outputs, profile.itemsize
        jacobians = (n_rows + n_cols) * o * profile.num_params * s
        # One example's graph at a time, and one gradient of every parameter.
        transient = profile.activation_bytes + profile.num_params * s
        return jacobians + transient + self.kernel_bytes(n_rows, n_cols)


def loop_jacobians(fmodel: FunctionalModel, x: Inputs, num_outputs: int) -> Dict[str, torch.Tensor]:
    """``{param name: J}`` with ``J[i, a] = d f_a(x_i) / d param`` flattened, ``(n, O, numel)``.

    A model that draws random numbers in eval mode draws them per example, as it would in
    a batch.
    """
    n = batch_size(x, "x")
    jacobians = {
        name: torch.zeros((n, num_outputs, p.numel()), dtype=fmodel.dtype, device=fmodel.device)
        for name, p in fmodel.params.items()
    }
    for i in range(n):
        rows = example_gradients(fmodel, slice_inputs(x, i, i + 1), fmodel.params)
        for a, grads in enumerate(rows):
            for name, grad in grads.items():
                jacobians[name][i, a] = grad.reshape(-1)
    return jacobians


def example_gradients(
    fmodel: FunctionalModel,
    x_one: Inputs,
    leaves: Dict[str, torch.Tensor],
    probes: Optional[Dict[str, torch.Tensor]] = None,
    after_forward: Optional[Callable[[], None]] = None,
) -> List[Dict[str, torch.Tensor]]:
    """For each output value ``a`` of the single example ``x_one``, the gradients of
    ``f_a`` with respect to ``leaves`` (parameters, differentiated) and ``probes`` (extra
    tensors that the forward adds somewhere, already requiring grad): a list of
    ``{name: gradient}``, dense, zeros where ``f_a`` does not depend on a tensor.
    ``after_forward()`` runs between the forward and the first backward pass."""
    params = {name: p.detach().requires_grad_(True) for name, p in leaves.items()}
    inputs = {**params, **(probes or {})}
    fixed = {name: p for name, p in fmodel.params.items() if name not in params}

    def backward(out: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        if after_forward is not None:
            after_forward()
        values = out.reshape(-1)
        rows = []
        for a in range(values.numel()):
            if not values.requires_grad or not inputs:
                grads = [None] * len(inputs)
            else:
                grads = torch.autograd.grad(
                    values[a], list(inputs.values()), retain_graph=a + 1 < values.numel(), allow_unused=True
                )
            rows.append({name: _dense(g, t) for (name, t), g in zip(inputs.items(), grads)})
        return rows

    with torch.enable_grad():
        return fmodel.with_output({**fixed, **params}, x_one, backward)


def _dense(grad, like: torch.Tensor) -> torch.Tensor:
    if grad is None:
        return torch.zeros_like(like)
    return grad.to_dense() if grad.layout != torch.strided else grad
