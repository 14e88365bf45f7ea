"""Which parameters the rules cover: the analysis behind the structured engine.

:func:`analyse` runs the model on one and on two examples, watching every use of every
selected parameter (:mod:`.calls`), and decides for each whether rules cover it exactly.
A use is covered

* inside a call of a module owning the parameter whose module rule covers it (forward
  hooks on those modules), or
* as a role argument of a torch function call that a function rule applies to -- wherever
  the call happens, including inside ``F.multi_head_attention_forward``.

A parameter is covered when *every* one of its uses is covered (tied weights may mix
both kinds), it is used at all, and every covering call passes two checks: the call
exists for two examples as for one and, for a rule that reads dim 0 as the batch, its
input and output are batched on dim 0; and no argument of the call is modified in place
later in the forward (the rule keeps the arguments it records for after the forward). Anything else -- ``torch.einsum`` on a
weight, a weight split into views, a layer without a rule -- sends the parameter to the
fallback (Jacobian contraction), with the reason.

Each (parameter set, calls) pair becomes a :class:`Bundle`; a parameter used by several
calls (weight sharing, a module called twice, a weight reused through ``F.linear``) yields
one term whose positions are those of all its calls, so every pair of calls contributes.
The capture of what flows through the calls is :mod:`.capture`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple, Union

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from ...functional import FunctionalModel, Inputs, batch_size, group_of, map_inputs, slice_inputs
from .calls import CallKey, FunctionSite, ModuleHooks, ModuleStack, UseObserver, modified
from .capture import measure_bundles
from .registry import FunctionRule, Rule, record_input, rule_for
from .terms import TermShape


@dataclass
class CallSite:
    """One covered call in the forward: of a module (``module``) or of a torch function
    (``function``, whose ``spec`` the rule's ``terms`` reads)."""

    key: CallKey
    module: Optional[nn.Module]
    rule: Union[Rule, FunctionRule]
    output_shape: Tuple[int, ...]  # per example (with a batch dim of 1)
    function: Optional[FunctionSite] = None

    @property
    def label(self) -> str:
        """The module path of the call (a function's: the module whose forward makes it)."""
        if self.function is None:
            return self.key[0]
        return self.function.where or "(root)"

    @property
    def type_name(self) -> str:
        return self.function.where_type if self.function is not None else type(self.module).__name__


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
    labels: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return ", ".join(self.labels)


@dataclass
class StructuredPlan:
    """What :func:`analyse` decided; see the module docstring."""

    calls: Dict[CallKey, CallSite]
    bundles: List[Bundle]
    fallback: Dict[str, str]  # parameter name -> why no rule covers it
    roles: Dict[str, Dict[CallKey, str]] = field(default_factory=dict)
    head: Optional["FlatHead"] = None

    @property
    def covered(self) -> List[str]:
        return [name for bundle in self.bundles for name in bundle.param_names]

    def term_shapes(self, fmodel: FunctionalModel) -> List[TermShape]:
        """Per-example shapes of the engine's terms: one per bundle, one per fallback parameter."""
        shapes = [bundle.shape for bundle in self.bundles]
        return shapes + [TermShape("gradient", fmodel.params[name].numel()) for name in self.fallback]


MIN_HEAD_WEIGHT = 1 << 16
"""The capture starts from a flat head only if its weight has at least this many entries
(``O d``): what it saves is one ``O x d`` copy of ``W`` per example, measurable for a wide
head (a CNN's over 16k features: 45 ms of 400) and not below (an MLP's 512 x 10: within
noise), where the general capture is kept."""


@dataclass(frozen=True)
class FlatHead:
    """An ``nn.Linear`` call whose output is the model's output, ``f(x) = W h + b`` with
    ``h`` the call's input ``(d,)`` per example: the cotangent of ``h`` for output ``a`` is
    ``W[a]`` and that of the call's output is the identity, so the capture starts its
    backward passes at ``h`` (:func:`.capture.capture`)."""

    key: CallKey
    weight: str  # the parameter name of W


# ---------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------

Owners = Dict[str, List[Tuple[str, nn.Module, str]]]


def _owners(model: nn.Module, fmodel: FunctionalModel) -> Owners:
    """``{selected parameter: [(module path, module, attribute), ...]}`` over every tie."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: Owners = {name: [] for name in fmodel.params}
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


def _module_rules(owners: Owners) -> Tuple[Dict[str, str], Dict[nn.Module, Tuple[str, Rule]], Dict[str, Set[int]]]:
    """``(notes, hooked, module_owners)``: why an owner's module rule cannot cover a
    parameter (no rule, attribute not covered, forward hooks, not applicable) -- uses
    there may still be covered by function rules --, the modules whose calls the module
    rules cover (with path and rule), and for each parameter the ids of those of its
    owners."""
    notes: Dict[str, str] = {}
    hooked: Dict[nn.Module, Tuple[str, Rule]] = {}
    module_owners: Dict[str, Set[int]] = {name: set() for name in owners}
    for name, places in owners.items():
        for path, module, attr in places:
            rule = rule_for(module)
            if rule is None:
                notes.setdefault(name, f"no rule for {type(module).__name__}")
            elif attr not in rule.roles:
                notes.setdefault(name, f"the {rule.name} rule does not cover .{attr}")
            elif module._forward_hooks or _module_hooks._global_forward_hooks:
                notes.setdefault(name, f"{type(module).__name__} has forward hooks, which may change its output")
            elif rule.applies(module) is not None:
                notes.setdefault(name, f"{type(module).__name__} rule does not apply: {rule.applies(module)}")
            else:
                hooked.setdefault(module, (path, rule))
                module_owners[name].add(id(module))
    return notes, hooked, module_owners


@dataclass
class _Observation:
    """What one forward pass showed: the hooked module calls, the function sites, and the
    calls (module call keys, site indices) one of whose arguments was modified in place
    later in the pass -- a rule would read the modified tensor."""

    module_calls: List[Tuple[CallKey, Tuple, object]]
    observer: UseObserver
    modified_calls: Set[CallKey]
    modified_sites: Set[int]
    output: torch.Tensor  # the model's output (after output_fn)


def _observe(fmodel: FunctionalModel, x: Inputs, hooked, module_owners) -> _Observation:
    watched = {id(fmodel.params[name]): name for name in fmodel.params}
    stack, hooks = ModuleStack(fmodel.model), ModuleHooks(hooked)
    observer = UseObserver(watched, stack, module_owners)
    with stack.attach(), hooks.attach(), observer:
        output = fmodel.raw_output(fmodel.params, x)
    modified_calls = {key for key, versions in hooks.versions.items() if modified(versions)}
    modified_sites = {i for i, versions in enumerate(observer.site_versions) if modified(versions)}
    observer.site_versions = []  # no tensors outlive the analysis
    return _Observation(list(hooks.calls), observer, modified_calls, modified_sites, output)


def analyse(fmodel: FunctionalModel, x: Inputs, num_outputs: int) -> StructuredPlan:
    """Decide coverage and build the bundles, from the first examples of ``x``."""
    owners = _owners(fmodel.model, fmodel)
    notes, hooked, module_owners = _module_rules(owners)
    module_at = {path: module for module, (path, _) in hooked.items()}
    n = batch_size(x, "x1")
    one = slice_inputs(x, 0, 1)
    two = slice_inputs(x, 0, 2) if n >= 2 else map_inputs(one, lambda t: torch.cat([t, t]))
    first, second = _observe(fmodel, one, hooked, module_owners), _observe(fmodel, two, hooked, module_owners)
    bad_modules = _bad_module_calls(first.module_calls, second.module_calls, hooked, module_at)
    for key in first.modified_calls:
        bad_modules.setdefault(id(module_at[key[0]]), "its input is modified in place after the call")
    sites = first.observer.sites
    bad_sites = _bad_sites(sites, second.observer.sites)
    for index in first.modified_sites:
        bad_sites.setdefault(index, f"an argument of its {sites[index].rule.name} call is modified in place later")

    order = [key for key, _, _ in first.module_calls]
    calls_of: Dict[int, List[CallKey]] = {}
    for key in order:
        calls_of.setdefault(id(module_at[key[0]]), []).append(key)
    fallback: Dict[str, str] = {}
    module_roles: Dict[str, Dict[CallKey, str]] = {}
    for name in owners:
        reason = first.observer.unrecognised.get(name)
        keys: Dict[CallKey, str] = {}
        for _, module, attr in owners[name]:
            if id(module) in module_owners[name]:
                reason = reason or bad_modules.get(id(module))
                keys.update({key: attr for key in calls_of.get(id(module), [])})
        for index, site in enumerate(sites):
            if any(param == name for param, _ in site.roles.values()):
                reason = reason or bad_sites.get(index)
        if reason is None and not keys and not any(p == name for s in sites for p, _ in s.roles.values()):
            reason = "it is not used by the forward pass"
        if reason is not None:
            fallback[name] = f"{notes[name]}; {reason}" if name in notes else reason
        else:
            module_roles[name] = keys
    calls, roles = _call_sites(first.module_calls, module_at, hooked, sites, module_roles, fallback)
    kept = {name: fallback[name] for name in fmodel.params if name in fallback}
    plan = StructuredPlan(calls, _bundles(roles, calls), kept, roles)
    plan.head = _flat_head(first, plan, fmodel, owners, num_outputs)
    measure_bundles(plan, fmodel, one, num_outputs)
    return plan


def _flat_head(first: _Observation, plan: StructuredPlan, fmodel: FunctionalModel, owners: Owners,
               num_outputs: int) -> Optional[FlatHead]:
    """The :class:`FlatHead` of the plan, if the model's output is the output tensor itself
    of a covered ``nn.Linear`` (its own forward) called once, mapping ``(1, d)`` to
    ``(1, O)``, all of whose selected parameters the rule covers (a fallback parameter of
    the call would need the output's own Jacobian), with at least :data:`MIN_HEAD_WEIGHT`
    weights."""
    for key, args, output in first.module_calls:
        if output is not first.output:
            continue
        site = plan.calls.get(key)
        # nn.Linear's own forward (y = x W^T + b), its rule recording the input x
        if (site is None or site.function is not None or site.rule.module_type is not nn.Linear
                or site.rule.record is not record_input):
            return None
        calls_of_module = [k for k, _, _ in first.module_calls if k[0] == key[0]]
        x = args[0] if args else None
        if (len(calls_of_module) != 1 or not isinstance(x, torch.Tensor) or x.dim() != 2
                or tuple(output.shape) != (1, num_outputs)):
            return None
        selected = [name for name, places in owners.items()
                    if any(module is site.module for _, module, _ in places)]
        if any(key not in plan.roles.get(name, {}) for name in selected):
            return None
        weight = [name for name in selected if plan.roles[name][key] == "weight"]
        if not weight or fmodel.params[weight[0]].numel() < MIN_HEAD_WEIGHT:
            return None
        return FlatHead(key, weight[0])
    return None


def _bad_module_calls(calls_one, calls_two, hooked, module_at: Dict[str, nn.Module]) -> Dict[int, str]:
    """For each hooked module whose calls a rule cannot take, the reason: not mapping a
    Tensor to a floating Tensor, not batched on dim 0 (when its rule reads dim 0 as the
    batch), or different calls for two examples than for one."""
    shapes_one, shapes_two = _call_shapes(calls_one), _call_shapes(calls_two)
    bad: Dict[int, str] = {}
    for key, shape in shapes_one.items():
        other = shapes_two.get(key)
        module = module_at[key[0]]
        if shape is None or other is None:
            bad.setdefault(id(module), "its call does not map a Tensor to a floating Tensor")
        elif hooked[module][1].batched and not _batched_pair(shape, other):
            bad.setdefault(id(module), "its input or output is not batched on dim 0")
    if len(shapes_two) != len(shapes_one):
        for module in module_at.values():
            bad.setdefault(id(module), "the module calls depend on the batch")
    return bad


def _call_shapes(calls) -> Dict[CallKey, Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]]:
    shapes = {}
    for key, args, output in calls:
        first = args[0] if args else None
        ok = isinstance(first, torch.Tensor) and isinstance(output, torch.Tensor) and output.is_floating_point()
        shapes[key] = (tuple(first.shape), tuple(output.shape)) if ok else None
    return shapes


def _batched_pair(one: Tuple[Tuple[int, ...], ...], two: Tuple[Tuple[int, ...], ...]) -> bool:
    """Whether each shape is ``(1, *s)`` for one example and ``(2, *s)`` for two."""
    return all(
        len(a) > 0 and len(b) > 0 and a[0] == 1 and b[0] == 2 and a[1:] == b[1:] for a, b in zip(one, two)
    )


def _bad_sites(sites: List[FunctionSite], sites_two: List[FunctionSite]) -> Dict[int, str]:
    """For each function site (by position in ``sites``) that a rule cannot take, why."""
    by_key = {site.match_key: site for site in sites_two}
    bad = {}
    for index, site in enumerate(sites):
        other = by_key.get(site.match_key)
        if other is None:
            bad[index] = f"its {site.rule.name} calls depend on the batch"
        elif site.rule.batched and (site.first_shape is None or not _batched_pair(
                (site.first_shape, site.spec.output_shape), (other.first_shape, other.spec.output_shape))):
            bad[index] = f"the input or output of its {site.rule.name} call is not batched on dim 0"
    return bad


def _call_sites(module_calls, module_at, hooked, sites: List[FunctionSite], module_roles, fallback):
    """The plan's calls (module calls, then function sites, in forward order) and each
    covered parameter's ``{call key: role}``."""
    roles = {name: dict(keys) for name, keys in module_roles.items()}
    calls: Dict[CallKey, CallSite] = {}
    for key, _, output in module_calls:
        if any(key in r for r in roles.values()):
            module = module_at[key[0]]
            calls[key] = CallSite(key, module, hooked[module][1], tuple(output.shape))
    covered = set(roles)
    for site in sites:
        capture_key = site.capture_key(covered)
        if capture_key is None:
            continue
        rule_name, role, param, index = capture_key
        key = (f"{rule_name}:{role}:{param}", index)
        params = tuple(r for r in site.rule.roles if r in site.roles and site.roles[r][0] in covered)
        site.spec = dataclasses.replace(site.spec, params=params)
        site.capture = capture_key
        calls[key] = CallSite(key, None, site.rule, site.spec.output_shape, site)
        for r in params:
            roles[site.roles[r][0]][key] = r
    return calls, roles


def _bundles(roles: Dict[str, Dict[CallKey, str]], calls: Dict[CallKey, CallSite]) -> List[Bundle]:
    """Parameters of one group with the same calls and rule form one bundle (a weight and
    its bias); every other covered parameter is a bundle of its own."""
    by_key: Dict[Tuple, List[str]] = {}
    for name, keys in roles.items():
        rule_names = tuple(sorted({calls[k].rule.name for k in keys}))
        by_key.setdefault((group_of(name), tuple(keys), rule_names), []).append(name)
    bundles = []
    for (group, keys, rule_names), names in by_key.items():
        types = tuple(dict.fromkeys(calls[k].type_name for k in keys))
        labels = tuple(dict.fromkeys(calls[k].label for k in keys))
        bundles.append(Bundle(group, tuple(names), keys, "+".join(rule_names), types, labels=labels))
    return bundles
