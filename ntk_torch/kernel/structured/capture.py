"""The one pass that captures what flows through the covered calls, and the terms built from it.

:func:`capture` computes, for a block of examples and in one ``vmap(jacrev)`` pass per
example (exactly like the Jacobian engine, so each example is evaluated alone):

* what each covered call's rule records (its input), as aux output;
* the cotangents ``d f_a(x_i) / d y_c`` of each call's output ``y_c``, as the Jacobian
  with respect to an additive zero *probe* on ``y_c`` (``(n, O, *out)``): module calls get
  theirs from a forward hook, function calls from the function mode (:mod:`.calls`);
* the per-example Jacobians of the fallback parameters.

When the model's output is that of an ``nn.Linear`` head, ``f = W h + b``
(:class:`.plan.FlatHead`), the backward passes start at the head's input ``h`` with the
cotangents ``W[a]`` (``vjp`` and ``vmap`` over the rows of ``W``) and the head's own
cotangent is the identity: the same values without the head's backward, a product with
``K = O`` that only copies rows of ``W`` for every example and output (on a CNN whose
head reads 16k features, 10% of the kernel's time). Should the output of a block not be
the head's, that block and every later one are captured the general way.

:func:`assemble` applies the rules to them: one term per bundle of the plan.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.func import jacrev, vjp, vmap
from torch.utils._pytree import tree_map

from ...functional import FunctionalModel, Inputs, batch_size, map_inputs
from .calls import CallKey, FunctionProbes, ModuleHooks, key_name
from .terms import DenseFeatures, GradientTerm, KroneckerTerm, Term, can_join

if TYPE_CHECKING:
    from .plan import Bundle, StructuredPlan


def _zero_probes(plan: "StructuredPlan", fmodel: FunctionalModel) -> Dict[str, torch.Tensor]:
    return {key_name(k): torch.zeros(c.output_shape, dtype=fmodel.dtype, device=fmodel.device)
            for k, c in plan.calls.items()}


@contextlib.contextmanager
def attached(plan: "StructuredPlan", fmodel: FunctionalModel,
             probes: Dict[str, torch.Tensor]) -> Iterator[Tuple[ModuleHooks, Optional[FunctionProbes]]]:
    """Hooks on the covered module calls and, when the plan has function sites, the
    function mode that finds them: each records and adds its probe for the block."""
    modules = {c.module: (k[0], c.rule) for k, c in plan.calls.items() if c.function is None}
    sites = {c.function.capture: key_name(k) for k, c in plan.calls.items() if c.function is not None}
    hooks = ModuleHooks(modules)
    mode = None
    if sites:
        mode = FunctionProbes({id(fmodel.params[name]): name for name in plan.covered}, sites, probes)
    with hooks.attach(probes, mode), (mode if mode is not None else contextlib.nullcontext()):
        yield hooks, mode


def records_of(hooks: ModuleHooks, mode: Optional[FunctionProbes]) -> Dict[str, object]:
    return {**hooks.records, **(mode.records if mode is not None else {})}


def check_same_calls(records: Dict[str, object], probes: Dict[str, torch.Tensor], method: str) -> None:
    """Raise unless a capture pass saw exactly the covered calls of the analysis;
    ``method`` is the engine to use instead."""
    if set(records) != set(probes):
        raise RuntimeError(
            "the model's calls differ from those seen when it was analysed "
            f"({sorted(records)} vs {sorted(probes)}); the structured engine "
            f"needs the same calls for every input: use method={method!r}"
        )


def measure_bundles(plan: "StructuredPlan", fmodel: FunctionalModel, one: Inputs, num_outputs: int) -> None:
    """Per-example term shapes, from a dry run of the rules with zero cotangents (laid out
    as :func:`capture` lays out one example's)."""
    if not plan.bundles:
        return
    probes = _zero_probes(plan, fmodel)
    with attached(plan, fmodel, probes) as (hooks, mode):
        fmodel(fmodel.params, one)
        records = tree_map(lambda r: r.unsqueeze(0), records_of(hooks, mode))
    cotangents = {
        name: torch.zeros((1, num_outputs) + p.shape, dtype=fmodel.dtype, device=fmodel.device)
        for name, p in probes.items()
    }
    terms = assemble(plan, *drop_example_axis(records, cotangents))
    for bundle, term in zip(plan.bundles, terms):
        bundle.shape = term.shape


def drop_example_axis(records, cotangents):
    """Inside the capture's vmap each example is a batch of one: drop that axis from
    records ``(n, 1, ...)`` and cotangents ``(n, O, 1, ...)`` (rules reshape by ``n``, so a
    call that is not batched on dim 0 keeps its own leading dimensions)."""
    records = tree_map(lambda r: r.squeeze(1) if r.dim() > 1 else r, records)
    cotangents = {name: c.squeeze(2) if c.dim() > 2 else c for name, c in cotangents.items()}
    return records, cotangents


def _primals(plan: "StructuredPlan", fmodel: FunctionalModel):
    """``(probes, fallback, fixed)``: the zero probes and the fallback parameters the
    capture differentiates, and the parameters it holds fixed."""
    fallback = {name: fmodel.params[name] for name in plan.fallback}
    fixed = {name: p for name, p in fmodel.params.items() if name not in fallback}
    return _zero_probes(plan, fmodel), fallback, fixed


def _recorded(plan: "StructuredPlan", fmodel: FunctionalModel, probe_values, run: Callable[[], torch.Tensor]):
    """``(run(), records, hooks)``: the model run once with the plan's hooks and function
    mode attached, its records checked to be of the same calls as the probes."""
    with attached(plan, fmodel, probe_values) as (hooks, mode):
        out = run()
        records = records_of(hooks, mode)
    check_same_calls(records, probe_values, "jacobian")
    return out, records, hooks


def capture(
    plan: "StructuredPlan", fmodel: FunctionalModel, x: Inputs, chunk_size: Optional[int]
) -> Tuple[Dict[str, object], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Records ``{call: (n, ...)}``, cotangents ``{call: (n, O, *out)}`` and fallback
    Jacobians ``{param: (n, O, *param)}`` of the block ``x`` (see the module docstring)."""
    if plan.head is not None:
        captured = _capture_from_head(plan, fmodel, x, chunk_size)
        if captured is not None:
            return captured
        plan.head = None  # the output is no longer the head's: stop trying for later blocks
    probes, fallback, fixed = _primals(plan, fmodel)

    def single(primals, x_one):
        probe_values, fallback_values = primals
        out, records, _ = _recorded(plan, fmodel, probe_values,
                                    lambda: fmodel.single({**fixed, **fallback_values}, x_one))
        return out, records

    per_example = jacrev(single, has_aux=True, chunk_size=chunk_size)
    # A model that draws random numbers in eval mode draws them per example, as the
    # Jacobian engine does.
    (cotangents, jacobians), records = vmap(per_example, in_dims=(None, 0), randomness="different")(
        (probes, fallback), x
    )
    records, cotangents = drop_example_axis(records, cotangents)
    return records, cotangents, jacobians


def _capture_from_head(
    plan: "StructuredPlan", fmodel: FunctionalModel, x: Inputs, chunk_size: Optional[int]
) -> Optional[Tuple[Dict[str, object], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
    """:func:`capture` for a model with a :class:`.plan.FlatHead`: one ``vjp`` per example
    from the head's input ``h`` ``(1, d)``, pulled back along each row of ``W`` ``(O, 1,
    d)``; None if the model's output was not the head's output in this block."""
    probes, fallback, fixed = _primals(plan, fmodel)
    head = key_name(plan.head.key)
    weight = fixed[plan.head.weight]
    rows = weight.reshape(weight.shape[0], 1, weight.shape[1])
    if chunk_size is not None and chunk_size >= rows.shape[0]:
        chunk_size = None  # one chunk: a chunked vmap would still concatenate (copy) it
    output_was_head: List[bool] = []  # one entry: vmap and vjp trace the function once

    def head_input(primals, x_one):
        probe_values, fallback_values = primals
        batched = map_inputs(x_one, lambda t: t.unsqueeze(0))
        out, records, hooks = _recorded(plan, fmodel, probe_values,
                                        lambda: fmodel.raw_output({**fixed, **fallback_values}, batched))
        output_was_head.append(out is hooks.outputs.get(head))
        return records[head], records

    def per_example(primals, x_one):
        _, pullback, records = vjp(lambda p: head_input(p, x_one), primals, has_aux=True)
        (cotangents,) = vmap(pullback, chunk_size=chunk_size)(rows)
        return cotangents, records

    (cotangents, jacobians), records = vmap(per_example, in_dims=(None, 0), randomness="different")(
        (probes, fallback), x
    )
    if not all(output_was_head):
        return None
    records, cotangents = drop_example_axis(records, cotangents)
    n, o = batch_size(x, "x"), weight.shape[0]
    cotangents[head] = torch.eye(o, dtype=weight.dtype, device=weight.device).expand(n, o, o).contiguous()
    return records, cotangents, jacobians


def assemble(
    plan: "StructuredPlan", records: Dict[str, object], cotangents: Dict[str, torch.Tensor]
) -> List[Term]:
    """One term per bundle, from the rules applied to each call."""
    per_call: Dict[CallKey, Dict[str, Term]] = {}
    for key, site in plan.calls.items():
        name = key_name(key)
        target = site.module if site.function is None else site.function.spec
        per_call[key] = site.rule.terms(target, records[name], cotangents[name])
    return [_bundle_term(bundle, plan, per_call) for bundle in plan.bundles]


def _bundle_term(bundle: "Bundle", plan: "StructuredPlan", per_call: Dict[CallKey, Dict[str, Term]]) -> Term:
    parts: List[List[Term]] = [
        [per_call[key][plan.roles[name][key]] for name in bundle.param_names] for key in bundle.calls
    ]
    fused = [_fuse(call_parts) for call_parts in parts]
    if (all(f is not None for f in fused) and can_join([f.features for f in fused])
            and len({f.transposed for f in fused}) == 1):
        if len(fused) == 1:
            return fused[0]
        features = type(fused[0].features).along_positions([f.features for f in fused])
        return KroneckerTerm(features, torch.cat([f.cotangent for f in fused], dim=3), transposed=fused[0].transposed)
    # Mixed forms: per-example gradients, laid out like the bundle's parameters, summed
    # over calls.
    total = None
    for call_parts in parts:
        grads = torch.cat([_grads(t) for t in call_parts], dim=2)
        total = grads if total is None else total + grads
    return GradientTerm(total)


def _fuse(terms: Sequence[Term]) -> Optional[KroneckerTerm]:
    """One Kronecker term for the roles of a call that share a cotangent (weight, bias)."""
    first = terms[0]
    if not all(isinstance(t, KroneckerTerm) and t.cotangent is first.cotangent
               and t.transposed == first.transposed for t in terms):
        return None
    if len(terms) == 1:
        return first
    if not all(isinstance(t.features, DenseFeatures) for t in terms):
        return None
    return KroneckerTerm(DenseFeatures.along_width([t.features for t in terms]), first.cotangent,
                         transposed=first.transposed)


def _grads(term: Term) -> torch.Tensor:
    return term.grads if isinstance(term, GradientTerm) else term.grads()
