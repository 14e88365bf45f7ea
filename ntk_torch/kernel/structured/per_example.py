"""The structured capture without function transforms, for models ``vmap`` cannot run.

:func:`~.plan.capture` differentiates each example inside ``vmap(jacrev)``; this capture
gives the same three results with plain autograd, one example at a time (each evaluated
alone, as a batch of one, as there): the forward runs with the rules' hooks attached,
which record each covered call's input and add a zero probe, requiring grad, to its
output; then one ``torch.autograd.grad`` per output value gives the cotangents ``d f_a /
d y_c`` (the probes' gradients) and the fallback parameters' Jacobian rows
(:func:`~..loop.example_gradients`).

The hooks stay attached during the backward passes: a checkpointed segment
(``torch.utils.checkpoint``, non-reentrant) recomputes its forward there, and those calls
(numbered after the forward's) add no probe and record nothing -- the probes' gradients
flow through the graph of the forward.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ...functional import FunctionalModel, Inputs, batch_size, slice_inputs
from ..loop import example_gradients
from .plan import StructuredPlan, _Hooks, key_name


def capture_per_example(
    plan: StructuredPlan, fmodel: FunctionalModel, x: Inputs
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Records ``{call: (n, ...)}``, cotangents ``{call: (n, O, *out)}`` and fallback
    Jacobians ``{param: (n, O, *param)}`` of the block ``x``, as :func:`.plan.capture`."""
    n = batch_size(x, "x")
    hooks = _Hooks({c.module: (k[0], c.rule) for k, c in plan.calls.items()})
    fallback = {name: fmodel.params[name] for name in plan.fallback}
    records: Dict[str, list] = {key_name(k): [] for k in plan.calls}
    cotangents: Dict[str, list] = {name: [] for name in records}
    jacobians: Dict[str, list] = {name: [] for name in fallback}
    for i in range(n):
        probes = {
            key_name(k): torch.zeros(c.output_shape, dtype=fmodel.dtype, device=fmodel.device).requires_grad_(True)
            for k, c in plan.calls.items()
        }
        with hooks.attach(probes):
            rows = example_gradients(
                fmodel, slice_inputs(x, i, i + 1), fallback, probes, after_forward=lambda: _same_calls(hooks, probes)
            )
        for name in records:
            records[name].append(hooks.records[name].detach())
            cotangents[name].append(torch.stack([row[name] for row in rows]).squeeze(1))
        for name in jacobians:
            jacobians[name].append(torch.stack([row[name] for row in rows]))
    return (
        {name: torch.cat(r) for name, r in records.items()},
        {name: torch.stack(c) for name, c in cotangents.items()},
        {name: torch.stack(j) for name, j in jacobians.items()},
    )


def _same_calls(hooks: _Hooks, probes: Dict[str, torch.Tensor]) -> None:
    """After the forward: its covered calls are those of the analysis."""
    if set(hooks.records) != set(probes):
        raise RuntimeError(
            "the model's module calls differ from those seen when it was analysed "
            f"({sorted(hooks.records)} vs {sorted(probes)}); the structured engine needs the "
            "same calls for every input: use method='loop'"
        )
