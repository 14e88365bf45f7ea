"""The structured capture without function transforms, for models ``vmap`` cannot run.

:func:`~.capture.capture` differentiates each example inside ``vmap(jacrev)``; this capture
gives the same three results with plain autograd, one example at a time (each evaluated
alone, as a batch of one, as there): the forward runs with the rules' hooks attached,
which record each covered call's input and add a zero probe, requiring grad, to its
output; then one ``torch.autograd.grad`` per output value gives the cotangents ``d f_a /
d y_c`` (the probes' gradients) and the fallback parameters' Jacobian rows
(:func:`~..loop.example_gradients`).

The hooks stay attached during the backward passes: a checkpointed segment
(``torch.utils.checkpoint``, non-reentrant) recomputes its forward there, and those module
calls (numbered after the forward's) add no probe and record nothing; the function mode
stops adding probes once the forward is done -- the probes' gradients flow through the
graph of the forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from torch.utils._pytree import tree_map

from ...functional import FunctionalModel, Inputs, batch_size, slice_inputs
from ..loop import example_gradients
from .calls import FunctionProbes, ModuleHooks, key_name
from .capture import attached, check_same_calls, drop_example_axis, records_of

if TYPE_CHECKING:
    from .plan import StructuredPlan


def capture_per_example(
    plan: "StructuredPlan", fmodel: FunctionalModel, x: Inputs
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Records ``{call: (n, ...)}``, cotangents ``{call: (n, O, *out)}`` and fallback
    Jacobians ``{param: (n, O, *param)}`` of the block ``x``, as :func:`.capture.capture`."""
    n = batch_size(x, "x")
    fallback = {name: fmodel.params[name] for name in plan.fallback}
    records: Dict[str, list] = {key_name(k): [] for k in plan.calls}
    cotangents: Dict[str, list] = {name: [] for name in records}
    jacobians: Dict[str, list] = {name: [] for name in fallback}
    for i in range(n):
        probes = {
            key_name(k): torch.zeros(c.output_shape, dtype=fmodel.dtype, device=fmodel.device).requires_grad_(True)
            for k, c in plan.calls.items()
        }
        with attached(plan, fmodel, probes) as (hooks, mode):
            rows = example_gradients(
                fmodel, slice_inputs(x, i, i + 1), fallback, probes,
                after_forward=lambda: _forward_done(hooks, mode, probes),
            )
            seen = records_of(hooks, mode)
        for name in records:
            records[name].append(tree_map(_detached, seen[name]))
            cotangents[name].append(torch.stack([row[name] for row in rows]))
        for name in jacobians:
            jacobians[name].append(torch.stack([row[name] for row in rows]))
    stacked = {name: tree_map(_stacked, *r) for name, r in records.items()}
    # Laid out as the vmap capture lays out its examples, then the same axis dropped.
    records_out, cotangents_out = drop_example_axis(stacked, {name: torch.stack(c) for name, c in cotangents.items()})
    return records_out, cotangents_out, {name: torch.stack(j) for name, j in jacobians.items()}


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _stacked(*values: Any) -> Any:
    """The examples' records of one leaf: stacked Tensors, or the one value they share."""
    return torch.stack(values) if isinstance(values[0], torch.Tensor) else values[0]


def _forward_done(hooks: ModuleHooks, mode: Optional[FunctionProbes], probes: Dict[str, torch.Tensor]) -> None:
    """After the forward: its covered calls are those of the analysis, and the function
    mode adds no probe to what a checkpointed segment recomputes in the backward passes."""
    check_same_calls(records_of(hooks, mode), probes, "loop")
    if mode is not None:
        mode.sites = {}
