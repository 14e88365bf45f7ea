"""Where the parameters are used in a forward pass, and the probes on the calls that use them.

Two mechanisms see the calls a rule covers:

* **module calls** -- forward hooks on the modules whose type has a rule
  (:class:`ModuleHooks`);
* **function calls** -- a ``TorchFunctionMode`` that sees every torch function call
  (:class:`UseObserver` during the analysis, :class:`FunctionProbes` during the capture).
  It also sees inside Python-level torch functions that a parameter is passed to (such as
  ``F.multi_head_attention_forward``, which applies ``in_proj_weight`` and
  ``out_proj.weight`` with ``F.linear``): such a function checks for overrides on entry
  and hands itself to the mode, so the mode runs a copy of it whose entry check is off
  (:func:`python_body`), with the mode active, and the torch calls in its body are seen
  one by one. A function the mode cannot see inside is one opaque use.

A function call is identified across forward passes by ``(rule, role, parameter, index)``:
the ``index``-th call of the rule's functions with that parameter in that argument.
Every pass counts the same calls in the same order (calls inside a rule's own function
are never counted), so the analysis and the capture agree on which call is which.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .registry import CallSpec, FunctionRule, Rule, function_rule_for

CallKey = Tuple[str, int]  # (module path or function-site label, index of the call within one forward)
SiteKey = Tuple[str, str, str, int]  # (rule name, role, parameter name, index)


def key_name(key: CallKey) -> str:
    return f"{key[0]}#{key[1]}"


Versions = List[Tuple[torch.Tensor, int]]


def tensor_versions(values: Any) -> Versions:
    """The tensors among ``values`` with their version counters, to tell later whether
    one was modified in place (a rule keeps a call's arguments for after the forward)."""
    return [(t, t._version) for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


def modified(versions: Versions) -> bool:
    return any(t._version != version for t, version in versions)


# ---------------------------------------------------------------------------------------
# Module calls
# ---------------------------------------------------------------------------------------

class ModuleHooks:
    """Forward hooks on covered modules, registered only inside :meth:`attach`.

    In *discovery* they note each call's shapes; in *capture* they record what the rule
    needs and add the call's zero probe to its output (with ``functions``, the function
    mode of the same pass, paused meanwhile).
    """

    def __init__(self, modules: Dict[nn.Module, Tuple[str, Rule]]):
        self.modules = modules
        self.counts: Dict[nn.Module, int] = {}
        self.probes: Optional[Dict[str, torch.Tensor]] = None
        self.calls: List[Tuple[CallKey, Tuple, Any]] = []
        self.versions: Dict[CallKey, Versions] = {}
        self.records: Dict[str, Any] = {}
        self.outputs: Dict[str, torch.Tensor] = {}  # what each probed call returned
        self.functions: Optional["FunctionCalls"] = None

    @contextlib.contextmanager
    def attach(self, probes: Optional[Dict[str, torch.Tensor]] = None,
               functions: Optional["FunctionCalls"] = None) -> Iterator["ModuleHooks"]:
        self.counts, self.calls, self.versions, self.records, self.outputs = {}, [], {}, {}, {}
        self.probes, self.functions = probes, functions
        handles = []
        try:
            for module in self.modules:
                handles.append(module.register_forward_hook(self._post, always_call=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _post(self, module: nn.Module, args, output):
        path, rule = self.modules[module]
        index = self.counts.get(module, 0)
        self.counts[module] = index + 1
        key = (path, index)
        if self.probes is None:
            self.calls.append((key, args, output))
            self.versions[key] = tensor_versions(args)
            return None
        name = key_name(key)
        if name not in self.probes:
            return None
        with paused(self.functions):
            self.records[name] = rule.record(module, args, output)
            self.outputs[name] = output + self.probes[name]
            return self.outputs[name]


class ModuleStack:
    """The modules being called, innermost last (hooks on every module inside :meth:`attach`)."""

    def __init__(self, model: nn.Module):
        self.paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
        self.modules = [m for _, m in model.named_modules()]
        self.stack: List[nn.Module] = []

    @contextlib.contextmanager
    def attach(self) -> Iterator["ModuleStack"]:
        self.stack = []
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

    def _post(self, module: nn.Module, args, output) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def innermost(self) -> Tuple[str, str]:
        """``(path, type name)`` of the module being called."""
        if not self.stack:
            return "", "the model"
        module = self.stack[-1]
        return self.paths.get(id(module), ""), type(module).__name__


# ---------------------------------------------------------------------------------------
# Function calls
# ---------------------------------------------------------------------------------------

_OVERRIDE_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")
_BODIES: Dict[Callable, Callable] = {}


def _no_override(*args, **kwargs) -> bool:
    return False


def python_body(func: Callable) -> Callable:
    """A Python-level torch function with its entry check for overrides off: the same code
    and closure over a copy of its globals in which ``has_torch_function*`` say False (a
    function without the check is returned as it is). Cached per function."""
    body = _BODIES.get(func)
    if body is None:
        names = func.__globals__
        if not any(name in names for name in _OVERRIDE_CHECKS):
            body = func
        else:
            scope = dict(names)
            scope.update({name: _no_override for name in _OVERRIDE_CHECKS if name in names})
            body = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
            body.__kwdefaults__ = func.__kwdefaults__
        _BODIES[func] = body
    return body


@contextlib.contextmanager
def paused(mode: Optional["FunctionCalls"]) -> Iterator[None]:
    """``mode`` passes every call straight through meanwhile (a rule's own recording)."""
    if mode is None:
        yield
        return
    before, mode.paused = mode.paused, True
    try:
        yield
    finally:
        mode.paused = before


def function_name(func: Callable) -> str:
    return getattr(func, "__name__", None) or repr(func)


class FunctionCalls(TorchFunctionMode):
    """The torch function calls of a forward pass that involve watched tensors (the
    parameters by identity, ``watched[id] = name``): counts the calls of rule functions,
    descends into Python-level functions, and lets subclasses act on each call."""

    def __init__(self, watched: Dict[int, str]):
        super().__init__()
        self.watched = watched
        self.counts: Dict[Tuple[str, str, str], int] = {}
        self.descending: List[Callable] = []
        self.paused = False

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        rule = function_rule_for(func)
        bound = None if rule is None else rule.bind(args, kwargs)
        if bound is not None:
            return self.rule_call(rule, func, args, kwargs, bound)
        return self.other_call(func, args, kwargs)

    def watched_in(self, values: Any) -> List[str]:
        """The watched tensors among ``values`` (any pytree), by name, in order."""
        return [self.watched[id(t)] for t in tree_flatten(values)[0] if id(t) in self.watched]

    def indices(self, rule: FunctionRule, bound: Mapping[str, Any]) -> Dict[str, Tuple[str, int]]:
        """``{role: (parameter, index)}`` for the watched tensors in the call's role
        arguments, counting this call."""
        found = {}
        for role in rule.roles:
            value = bound.get(role)
            name = self.watched.get(id(value)) if isinstance(value, torch.Tensor) else None
            if name is not None:
                counter = (rule.name, role, name)
                found[role] = (name, self.counts.get(counter, 0))
                self.counts[counter] = found[role][1] + 1
        return found

    def descend(self, func: Callable, args, kwargs):
        """Run ``func`` so that the torch calls in its body are seen (when it is a Python
        function not already being descended into), else plainly."""
        if not isinstance(func, types.FunctionType) or func in self.descending:
            return func(*args, **kwargs)
        self.descending.append(func)
        try:
            with self:
                return python_body(func)(*args, **kwargs)
        finally:
            self.descending.pop()

    def rule_call(self, rule: FunctionRule, func, args, kwargs, bound: Dict[str, Any]):
        raise NotImplementedError

    def other_call(self, func, args, kwargs):
        raise NotImplementedError


def _why_not(rule: FunctionRule, bound: Mapping[str, Any], out: Any) -> Optional[str]:
    """Why ``rule`` cannot take this call, or None."""
    try:
        reason = rule.applies(bound)
    except Exception as error:  # a rule that cannot read the call does not apply to it
        reason = f"its applies() failed ({type(error).__name__}: {error})"
    if reason is None and not (isinstance(out, torch.Tensor) and out.is_floating_point()):
        reason = "its output is not a floating Tensor"
    return reason


def _returns_tensor(value: Any) -> bool:
    return any(isinstance(t, torch.Tensor) for t in tree_flatten(value)[0])


def _static_values(bound: Mapping[str, Any]) -> Dict[str, Any]:
    """The arguments holding no tensor (lists made tuples)."""
    values = {}
    for name, value in bound.items():
        if isinstance(value, torch.Tensor) or any(isinstance(t, torch.Tensor) for t in tree_flatten(value)[0]):
            continue
        values[name] = tuple(value) if isinstance(value, list) else value
    return values


@dataclass
class FunctionSite:
    """One call of a rule's function with parameters in its role arguments."""

    rule: FunctionRule
    roles: Dict[str, Tuple[str, int]]  # role -> (parameter name, index)
    where: str  # path of the module whose forward makes the call
    where_type: str
    spec: CallSpec
    first_shape: Optional[Tuple[int, ...]]  # per-example shape of the first argument
    capture: Optional[SiteKey] = None  # set by the plan: how the capture finds this call

    @property
    def match_key(self) -> Tuple:
        return tuple(sorted((role, name, index) for role, (name, index) in self.roles.items())) + (self.rule.name,)

    def capture_key(self, covered: Set[str]) -> Optional[SiteKey]:
        """How the capture recognises this call: by its first role holding a covered parameter."""
        for role in self.rule.roles:
            if role in self.roles and self.roles[role][0] in covered:
                name, index = self.roles[role]
                return (self.rule.name, role, name, index)
        return None


class UseObserver(FunctionCalls):
    """The analysis pass: how each watched parameter is used.

    A use is *recognised* when it happens inside a call of a module owning the parameter
    whose rule covers it (``module_owners[name]`` holds their ids), or when the parameter
    is a role argument (and no other argument) of a call that a function rule applies to
    (a :class:`FunctionSite`); everything else is an unrecognised use, with its reason.
    """

    def __init__(self, watched: Dict[int, str], stack: ModuleStack, module_owners: Dict[str, Set[int]]):
        super().__init__(watched)
        self.stack = stack
        self.module_owners = module_owners
        self.sites: List[FunctionSite] = []
        self.site_versions: List[Versions] = []
        self.unrecognised: Dict[str, str] = {}
        self.use_counts: Dict[str, int] = {}

    def _note(self, names: List[str]) -> None:
        for name in names:
            self.use_counts[name] = self.use_counts.get(name, 0) + 1

    def _in_owner(self, name: str) -> bool:
        owners = self.module_owners.get(name, ())
        return any(id(m) in owners for m in self.stack.stack)

    def _reject(self, name: str, reason: str) -> None:
        self.unrecognised.setdefault(name, reason)

    def rule_call(self, rule, func, args, kwargs, bound):
        present = self.watched_in((args, kwargs))
        self._note(present)
        roles = self.indices(rule, bound)
        out = func(*args, **kwargs)
        where, where_type = self.stack.innermost()
        self._reject_stray(rule, present, [name for name, _ in roles.values()], where_type)
        open_roles = {
            role: v for role, v in roles.items() if not self._in_owner(v[0]) and v[0] not in self.unrecognised
        }
        if not open_roles:
            return out
        reason = _why_not(rule, bound, out)
        if reason is not None:
            for name, _ in open_roles.values():
                self._reject(name, f"the {rule.name} rule does not apply to its call (inside {where_type}): {reason}")
            return out
        shapes = {k: tuple(v.shape) for k, v in bound.items() if isinstance(v, torch.Tensor)}
        spec = CallSpec(_static_values(bound), shapes, tuple(out.shape))
        first = bound.get(rule.arguments[0])
        first_shape = tuple(first.shape) if isinstance(first, torch.Tensor) else None
        self.sites.append(FunctionSite(rule, open_roles, where, where_type, spec, first_shape))
        self.site_versions.append(tensor_versions(bound))
        return out

    def _reject_stray(self, rule: FunctionRule, present: List[str], in_roles: List[str], where_type: str) -> None:
        """A parameter in an argument that is not a role, or in two roles, is not covered
        by the call (unless the call is inside an owner whose module rule covers it)."""
        for name in present:
            stray = in_roles.count(name) != present.count(name) or in_roles.count(name) > 1
            if stray and not self._in_owner(name):
                roles = "/".join(rule.roles)
                self._reject(name, f"used directly by {rule.name} other than as its {roles} (inside {where_type})")

    def other_call(self, func, args, kwargs):
        present = self.watched_in((args, kwargs))
        if not present:
            return func(*args, **kwargs)
        self._note(present)
        before = {name: self.use_counts[name] for name in present}
        out = self.descend(func, args, kwargs)
        if _returns_tensor(out):
            _, where_type = self.stack.innermost()
            for name in present:
                seen_inside = self.use_counts[name] > before[name]
                if not seen_inside and not self._in_owner(name):
                    self._reject(name, f"used directly by {function_name(func)} (inside {where_type})")
        return out


class FunctionProbes(FunctionCalls):
    """The capture pass: at each planned function site (``sites[key] = probe name``), keep
    what the rule records and add the site's zero probe to the call's output."""

    def __init__(self, watched: Dict[int, str], sites: Dict[SiteKey, str], probes: Mapping[str, torch.Tensor]):
        super().__init__(watched)
        self.sites = sites
        self.probes = probes
        self.records: Dict[str, Any] = {}

    def rule_call(self, rule, func, args, kwargs, bound):
        roles = self.indices(rule, bound)
        name = None
        for role in rule.roles:
            if role in roles:
                name = self.sites.get((rule.name, role) + roles[role])
                break
        out = func(*args, **kwargs)
        if name is None:
            return out
        self.records[name] = rule.record(bound)
        return out + self.probes[name]

    def other_call(self, func, args, kwargs):
        if not self.watched_in((args, kwargs)):
            return func(*args, **kwargs)
        return self.descend(func, args, kwargs)
