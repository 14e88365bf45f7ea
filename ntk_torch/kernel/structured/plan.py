"""Which parameters the rules cover, and the pass that captures what flows through them.

:func:`analyse` runs the model on one and on two examples with forward hooks on every
module that has a rule, and decides for each selected parameter whether a rule covers it
exactly. A parameter is covered when every module owning it (tied weights have several)
has an applicable rule, at least one of them is called, every call's input and output are
batched on dim 0, and the parameter is used only inside its owners' calls -- watched
with a ``TorchFunctionMode``, so ``F.linear(h, self.embed.weight)`` in a parent's forward
or ``MultiheadAttention`` passing ``out_proj.weight`` to ``F.multi_head_attention_forward``
send that parameter to the fallback. The rest fall back to Jacobian contraction.

:func:`capture` then computes, for a block of examples and in one ``vmap(jacrev)`` pass
per example (exactly like the Jacobian engine, so each example is evaluated alone):

* what each covered call's rule records (its input), as aux output;
* the cotangents ``d f_a(x_i) / d y_c`` of each call's output ``y_c``, as the Jacobian
  with respect to an additive zero *probe* on ``y_c`` (``(n, O, *out)``);
* the per-example Jacobians of the fallback parameters.

Each (parameter set, calls) pair becomes a :class:`Bundle`; a module called several times
(weight sharing) yields one term whose positions are those of all its calls, so every
pair of calls contributes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.func import jacrev, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ...functional import FunctionalModel, Inputs, batch_size, group_of, map_inputs, slice_inputs
from .registry import Rule, rule_for
from .terms import DenseFeatures, GradientTerm, KroneckerTerm, Term, TermShape, can_join

CallKey = Tuple[str, int]  # (module path, index of the call within one forward)


@dataclass
class CallSite:
    """One call of a covered module in the forward."""

    key: CallKey
    module: nn.Module
    rule: Rule
    output_shape: Tuple[int, ...]  # per example (with a batch dim of 1)


@dataclass
class Bundle:
    """Parameters contracted together as one term: one or more roles of the same calls.

    ``roles[name]`` is the parameter's attribute name in the module of each call.
    """

    group: str
    param_names: Tuple[str, ...]
    calls: Tuple[CallKey, ...]
    rule: str
    module_types: Tuple[str, ...]
    shape: Optional[TermShape] = None

    @property
    def label(self) -> str:
        paths = sorted({path for path, _ in self.calls}, key=[p for p, _ in self.calls].index)
        return ", ".join(paths)


@dataclass
class StructuredPlan:
    """What :func:`analyse` decided; see the module docstring."""

    calls: Dict[CallKey, CallSite]
    bundles: List[Bundle]
    fallback: Dict[str, str]  # parameter name -> why no rule covers it
    roles: Dict[str, Dict[CallKey, str]] = field(default_factory=dict)

    @property
    def covered(self) -> List[str]:
        return [name for bundle in self.bundles for name in bundle.param_names]

    def term_shapes(self, fmodel: FunctionalModel) -> List[TermShape]:
        """Per-example shapes of the engine's terms: one per bundle, one per fallback parameter."""
        shapes = [bundle.shape for bundle in self.bundles]
        return shapes + [TermShape("gradient", fmodel.params[name].numel()) for name in self.fallback]


# ---------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------

class _Hooks:
    """Forward hooks on covered modules, registered only inside :meth:`attach`.

    In *discovery* they note each call's shapes; in *capture* they record what the rule
    needs and add the call's zero probe to its output.
    """

    def __init__(self, modules: Dict[nn.Module, Tuple[str, Rule]]):
        self.modules = modules
        self.counts: Dict[nn.Module, int] = {}
        self.stack: List[nn.Module] = []
        self.probes: Optional[Dict[str, torch.Tensor]] = None
        self.calls: List[Tuple[CallKey, Tuple, torch.Tensor]] = []
        self.records: Dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def attach(self, probes: Optional[Dict[str, torch.Tensor]] = None) -> Iterator["_Hooks"]:
        self.counts, self.stack, self.calls, self.records = {}, [], [], {}
        self.probes = probes
        handles = []
        try:
            for module in self.modules:
                handles.append(module.register_forward_pre_hook(self._pre))
                handles.append(module.register_forward_hook(self._post, always_call=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _pre(self, module: nn.Module, args) -> None:
        self.stack.append(module)

    def _post(self, module: nn.Module, args, output):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        path, rule = self.modules[module]
        index = self.counts.get(module, 0)
        self.counts[module] = index + 1
        key = (path, index)
        if self.probes is None:
            self.calls.append((key, args, output))
            return None
        name = key_name(key)
        if name not in self.probes:
            return None
        self.records[name] = rule.record(module, args, output)
        return output + self.probes[name]


def key_name(key: CallKey) -> str:
    return f"{key[0]}#{key[1]}"


class _UseWatcher(TorchFunctionMode):
    """Flags parameters consumed by a torch function outside a call of an owner module."""

    def __init__(self, hooks: _Hooks, watched: Dict[int, str], owners: Dict[str, set]):
        super().__init__()
        self.hooks = hooks
        self.watched = watched
        self.owners = owners
        self.outside: Dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        used = [self.watched[id(t)] for t in tree_flatten((args, kwargs))[0] if id(t) in self.watched]
        if used and any(isinstance(t, torch.Tensor) for t in tree_flatten(result)[0]):
            current = self.hooks.stack[-1] if self.hooks.stack else None
            for name in used:
                if id(current) not in self.owners[name] and name not in self.outside:
                    where = f"inside {type(current).__name__}" if current is not None else "outside its module"
                    func_name = getattr(func, "__name__", repr(func))
                    self.outside[name] = f"used directly by {func_name} ({where})"
        return result


# ---------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------

def _owners(model: nn.Module, fmodel: FunctionalModel) -> Dict[str, List[Tuple[str, nn.Module, str]]]:
    """``{selected parameter: [(module path, module, attribute), ...]}`` over every tie."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: Dict[str, List[Tuple[str, nn.Module, str]]] = {name: [] for name in fmodel.params}
    seen = set()
    for full_name, p in model.named_parameters(remove_duplicate=False):
        name = canonical[id(p)]
        if name not in owners:
            continue
        path, _, attr = full_name.rpartition(".")
        module = modules[path]
        if (id(module), attr) in seen:
            continue
        seen.add((id(module), attr))
        owners[name].append((path, module, attr))
    return owners


def _batched(t, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n


def _call_shapes(calls) -> Dict[CallKey, Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]]:
    shapes = {}
    for key, args, output in calls:
        first = args[0] if args else None
        ok = isinstance(first, torch.Tensor) and isinstance(output, torch.Tensor) and output.is_floating_point()
        shapes[key] = (tuple(first.shape), tuple(output.shape)) if ok else None
    return shapes


def analyse(fmodel: FunctionalModel, x: Inputs, num_outputs: int) -> StructuredPlan:
    """Decide coverage and build the bundles, from the first examples of ``x``."""
    owners = _owners(fmodel.model, fmodel)
    fallback, hooked = _rule_candidates(owners)
    candidates = [n for n in owners if n not in fallback]
    # Drop modules owning no parameter that might still be covered.
    needed = {id(m) for n in candidates for _, m, _ in owners[n]}
    hooked = {m: v for m, v in hooked.items() if id(m) in needed}
    module_at = {path: module for module, (path, _) in hooked.items()}

    one = slice_inputs(x, 0, 1)
    hooks = _Hooks(hooked)
    watched = {id(fmodel.params[name]): name for name in candidates}
    owner_ids = {name: {id(m) for _, m, _ in owners[name]} for name in candidates}
    watcher = _UseWatcher(hooks, watched, owner_ids)
    calls_one, bad_calls = _observe_calls(fmodel, x, hooks, watcher, module_at)

    calls_of: Dict[int, List[CallKey]] = {}
    for key, _, _ in calls_one:
        calls_of.setdefault(id(module_at[key[0]]), []).append(key)
    order = [key for key, _, _ in calls_one]
    roles: Dict[str, Dict[CallKey, str]] = {}
    for name in candidates:
        reason = watcher.outside.get(name)
        keys: Dict[CallKey, str] = {}
        for _, module, attr in owners[name]:
            reason = reason or bad_calls.get(id(module))
            for key in calls_of.get(id(module), []):
                keys[key] = attr
        if reason is None and not keys:
            reason = "its module is never called"
        if reason is not None:
            fallback[name] = reason
        else:
            roles[name] = dict(sorted(keys.items(), key=lambda kv: order.index(kv[0])))

    calls = {}
    for key, _, output in calls_one:
        if any(key in r for r in roles.values()):
            module = module_at[key[0]]
            calls[key] = CallSite(key, module, hooked[module][1], tuple(output.shape))
    kept = {n: fallback[n] for n in fmodel.params if n in fallback}
    plan = StructuredPlan(calls, _bundles(roles, calls), kept, roles)
    _measure_bundles(plan, fmodel, one, num_outputs)
    return plan


def _rule_candidates(
    owners: Dict[str, List[Tuple[str, nn.Module, str]]]
) -> Tuple[Dict[str, str], Dict[nn.Module, Tuple[str, Rule]]]:
    """``(fallback, hooked)``: why each parameter no rule can cover falls back, and the
    modules (with path and rule) whose calls must be watched for the others."""
    fallback: Dict[str, str] = {}
    hooked: Dict[nn.Module, Tuple[str, Rule]] = {}
    for name, places in owners.items():
        for path, module, attr in places:
            rule = rule_for(module)
            if rule is None:
                fallback.setdefault(name, f"no rule for {type(module).__name__}")
            elif attr not in rule.roles:
                fallback.setdefault(name, f"the {rule.name} rule does not cover .{attr}")
            elif module._forward_hooks or _module_hooks._global_forward_hooks:
                fallback.setdefault(name, f"{type(module).__name__} has forward hooks, which may change its output")
            elif rule.applies(module) is not None:
                fallback.setdefault(name, f"{type(module).__name__} rule does not apply: {rule.applies(module)}")
            else:
                hooked.setdefault(module, (path, rule))
    return fallback, hooked


def _observe_calls(
    fmodel: FunctionalModel,
    x: Inputs,
    hooks: _Hooks,
    watcher: _UseWatcher,
    module_at: Dict[str, nn.Module],
) -> Tuple[List[Tuple[CallKey, Tuple, torch.Tensor]], Dict[int, str]]:
    """The hooked calls of a forward pass on one example, and for each module whose calls
    are not batched on dim 0 (compared with a pass on two examples) the reason."""
    n = batch_size(x, "x1")
    one = slice_inputs(x, 0, 1)
    two = slice_inputs(x, 0, 2) if n >= 2 else map_inputs(one, lambda t: torch.cat([t, t]))
    with hooks.attach(), watcher:
        fmodel(fmodel.params, one)
    calls_one = list(hooks.calls)
    shapes_one = _call_shapes(calls_one)
    with hooks.attach():
        fmodel(fmodel.params, two)
    shapes_two = _call_shapes(hooks.calls)

    bad_calls: Dict[int, str] = {}
    for key, shape in shapes_one.items():
        other = shapes_two.get(key)
        module = module_at[key[0]]
        if shape is None or other is None:
            bad_calls.setdefault(id(module), "its call does not map a Tensor to a floating Tensor")
        elif not (shape[0][0] == 1 and shape[1][0] == 1 and other[0][0] == 2 and other[1][0] == 2
                  and shape[0][1:] == other[0][1:] and shape[1][1:] == other[1][1:]):
            bad_calls.setdefault(id(module), "its input or output is not batched on dim 0")
    if len(shapes_two) != len(shapes_one):
        for module in module_at.values():
            bad_calls.setdefault(id(module), "the module calls depend on the batch")
    return calls_one, bad_calls


def _bundles(roles: Dict[str, Dict[CallKey, str]], calls: Dict[CallKey, CallSite]) -> List[Bundle]:
    """Parameters of one group with the same calls and rule form one bundle (a weight and
    its bias); every other covered parameter is a bundle of its own."""
    by_key: Dict[Tuple, List[str]] = {}
    for name, keys in roles.items():
        rule_names = tuple(sorted({calls[k].rule.name for k in keys}))
        by_key.setdefault((group_of(name), tuple(keys), rule_names), []).append(name)
    bundles = []
    for (group, keys, rule_names), names in by_key.items():
        types = tuple(dict.fromkeys(type(calls[k].module).__name__ for k in keys))
        bundles.append(Bundle(group, tuple(names), keys, "+".join(rule_names), types))
    return bundles


def _measure_bundles(plan: StructuredPlan, fmodel: FunctionalModel, one: Inputs, num_outputs: int) -> None:
    """Per-example term shapes, from a dry run of the rules with zero cotangents."""
    if not plan.bundles:
        return
    probes = {key_name(k): torch.zeros(c.output_shape, dtype=fmodel.dtype, device=fmodel.device)
              for k, c in plan.calls.items()}
    hooks = _Hooks({c.module: (k[0], c.rule) for k, c in plan.calls.items()})
    with hooks.attach(probes):
        fmodel(fmodel.params, one)
    records = hooks.records
    cotangents = {
        name: torch.zeros((1, num_outputs) + p.shape[1:], dtype=fmodel.dtype, device=fmodel.device)
        for name, p in probes.items()
    }
    terms = assemble(plan, records, cotangents)
    for bundle, term in zip(plan.bundles, terms):
        bundle.shape = term.shape


# ---------------------------------------------------------------------------------------
# Capture and assembly
# ---------------------------------------------------------------------------------------

def capture(
    plan: StructuredPlan, fmodel: FunctionalModel, x: Inputs, chunk_size: Optional[int]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Records ``{call: (n, ...)}``, cotangents ``{call: (n, O, *out)}`` and fallback
    Jacobians ``{param: (n, O, *param)}`` of the block ``x`` (see the module docstring)."""
    probes = {key_name(k): torch.zeros(c.output_shape, dtype=fmodel.dtype, device=fmodel.device)
              for k, c in plan.calls.items()}
    fallback = {name: fmodel.params[name] for name in plan.fallback}
    fixed = {name: p for name, p in fmodel.params.items() if name not in fallback}
    hooks = _Hooks({c.module: (k[0], c.rule) for k, c in plan.calls.items()})

    def single(primals, x_one):
        probe_values, fallback_values = primals
        with hooks.attach(probe_values):
            out = fmodel.single({**fixed, **fallback_values}, x_one)
            if set(hooks.records) != set(probe_values):
                raise RuntimeError(
                    "the model's module calls differ from those seen when it was analysed "
                    f"({sorted(hooks.records)} vs {sorted(probe_values)}); the structured "
                    "engine needs the same calls for every input: use method='jacobian'"
                )
        return out, dict(hooks.records)

    per_example = jacrev(single, has_aux=True, chunk_size=chunk_size)
    # A model that draws random numbers in eval mode draws them per example, as the
    # Jacobian engine does.
    (cotangents, jacobians), records = vmap(per_example, in_dims=(None, 0), randomness="different")(
        (probes, fallback), x
    )
    # Inside the vmap each example is a batch of one: drop that axis.
    records = {name: r.squeeze(1) for name, r in records.items()}
    cotangents = {name: c.squeeze(2) for name, c in cotangents.items()}
    return records, cotangents, jacobians


def assemble(
    plan: StructuredPlan, records: Dict[str, torch.Tensor], cotangents: Dict[str, torch.Tensor]
) -> List[Term]:
    """One term per bundle, from the rules applied to each call."""
    per_call: Dict[CallKey, Dict[str, Term]] = {}
    for key, site in plan.calls.items():
        name = key_name(key)
        per_call[key] = site.rule.terms(site.module, records[name], cotangents[name])
    return [_bundle_term(bundle, plan, per_call) for bundle in plan.bundles]


def _bundle_term(bundle: Bundle, plan: StructuredPlan, per_call: Dict[CallKey, Dict[str, Term]]) -> Term:
    parts: List[List[Term]] = [
        [per_call[key][plan.roles[name][key]] for name in bundle.param_names] for key in bundle.calls
    ]
    fused = [_fuse(call_parts) for call_parts in parts]
    if all(f is not None for f in fused) and can_join([f.features for f in fused]):
        if len(fused) == 1:
            return fused[0]
        features = type(fused[0].features).along_positions([f.features for f in fused])
        return KroneckerTerm(features, torch.cat([f.cotangent for f in fused], dim=3))
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
    if not all(isinstance(t, KroneckerTerm) and t.cotangent is first.cotangent for t in terms):
        return None
    if len(terms) == 1:
        return first
    if not all(isinstance(t.features, DenseFeatures) for t in terms):
        return None
    return KroneckerTerm(DenseFeatures.along_width([t.features for t in terms]), first.cotangent)


def _grads(term: Term) -> torch.Tensor:
    return term.grads if isinstance(term, GradientTerm) else term.grads()
