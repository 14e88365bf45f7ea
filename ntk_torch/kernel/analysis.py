"""What a kernel computation measures before its first block, remembered per :class:`~.api.NTK`.

Before the first block, an ``NTK`` runs a few forward passes on one or two examples: the
output size ``O``, the :class:`~.cost.ForwardProfile` (FLOPs, activation bytes), the dry
runs of the ways of differentiating the engines need (:mod:`.capability`: ``vmap``,
forward mode) and, for the structured engine, the coverage analysis
(:func:`.structured.analyse`). None of them
depends on parameter *values* -- only on what the forward does with which tensors -- so an
:class:`AnalysisMemo` keeps them and reuses them while the model's structure, its
tensors' identity and the inputs' feature shapes stay the same. This matters for small
models and for the tracker, which measures the same probe set every few steps while the
optimizer updates the parameters in place.

The key (:func:`signature`) covers everything the measurements read:

* every module path with the module's identity and type, its configuration
  (``extra_repr()``), an instance-level ``forward`` override and its hooks, plus torch's
  global module hooks;
* every parameter and buffer: name, identity, shape, dtype, device and ``requires_grad``
  (so swapping in a new tensor, resizing one or freezing one invalidates the entry);
* the selected parameters, the compute dtype and ``output_fn``;
* the inputs' structure, feature shapes (all but the batch dimension), dtypes and devices,
  and ``min(N, 2)`` (the analysis looks at one and two examples).

Entries hold no tensors and no modules (a structured plan refers to modules by path and
is bound to the model again on use), and a memo keeps at most :data:`MAX_ENTRIES` of them
(the most recently used). A custom module whose behaviour changes through an attribute that its
``extra_repr`` does not show needs a new ``NTK`` (or :meth:`AnalysisMemo.clear`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..functional import FunctionalModel, Inputs, input_tensors, slice_inputs, structure
from .capability import check
from .cost import ForwardProfile, profile_forward
from .structured import StructuredPlan, analyse

MAX_ENTRIES = 4


def _hook_keys(hooks: Dict) -> Tuple:
    return tuple((k, id(v)) for k, v in hooks.items())


def _global_hooks() -> Tuple:
    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
        "_global_forward_hooks_always_called",
    )
    return tuple(_hook_keys(getattr(_module, n, {}) or {}) for n in names)


def _callable_key(fn: Any) -> Hashable:
    """A key that matches only the same live callable (weakly held), or nothing."""
    if fn is None:
        return None
    try:
        return weakref.ref(fn)
    except TypeError:
        return object()  # cannot be held weakly: never matches


def _code_key(fn: Any) -> Hashable:
    """An instance-level ``forward`` override, by its code (holds no module)."""
    if fn is None:
        return None
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    return (id(fn), code) if code is not None else _callable_key(fn)


def _tensor_key(t: torch.Tensor) -> Tuple:
    return (id(t), tuple(t.shape), t.dtype, t.device, t.requires_grad)


def signature(fmodel: FunctionalModel, x: Inputs, n: int) -> Hashable:
    """The cache key of a kernel computation (see the module docstring)."""
    model = fmodel.model
    modules = []
    for path, m in model.named_modules(remove_duplicate=False):
        try:
            config = m.extra_repr()
        except Exception:  # a broken extra_repr must not break the kernel
            config = None
        modules.append((
            path, id(m), type(m), config, _code_key(m.__dict__.get("forward")),
            _hook_keys(m._forward_hooks), _hook_keys(m._forward_pre_hooks),
            _hook_keys(getattr(m, "_forward_hooks_with_kwargs", {})),
        ))
    params = tuple((name, _tensor_key(p)) for name, p in model.named_parameters(remove_duplicate=False))
    buffers = tuple((name, _tensor_key(b)) for name, b in model.named_buffers(remove_duplicate=False))
    inputs = tuple(
        (name, tuple(t.shape[1:]), t.dtype, t.device) for name, t in input_tensors(x, "x1")
    )
    return (
        tuple(modules), params, buffers, tuple(fmodel.params), fmodel.dtype, _callable_key(fmodel.output_fn),
        structure(x), inputs, min(n, 2), _global_hooks(),
    )


@dataclass(frozen=True)
class Analysis:
    """What one model and input shape cost, and which parameters the structured rules cover.

    Attributes:
        num_outputs: ``O``.
        profile: the forward profile of one example.
        plan: the structured engine's coverage (None until a method needs it).
        checks: ``{check: None or why not}`` for the :mod:`.capability` checks run so far
            (each runs once, when a method first needs it).
    """

    num_outputs: int
    profile: ForwardProfile
    plan: Optional[StructuredPlan] = None
    checks: Mapping[str, Optional[str]] = field(default_factory=dict)

    def fails(self, name: str) -> Optional[str]:
        """Why the check ``name`` failed, or None (passed or not run)."""
        return self.checks.get(name)


class AnalysisMemo:
    """The :class:`Analysis` of the most recent :data:`MAX_ENTRIES` signatures."""

    def __init__(self) -> None:
        self._entries: "OrderedDict[Hashable, Analysis]" = OrderedDict()
        self._warned: Dict[str, None] = {}

    def first_warning(self, reason: str) -> bool:
        """Whether ``reason`` is new to this memo (then it is remembered): a fallback is
        warned about once per ``NTK``."""
        if reason in self._warned:
            return False
        self._warned[reason] = None
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every analysis."""
        self._entries.clear()

    def analyse(
        self, fmodel: FunctionalModel, x1: Inputs, n1: int, need_plan: bool, checks: Sequence[str] = ()
    ) -> Analysis:
        """``O``, the forward profile, the :mod:`.capability` ``checks`` asked for and
        (when ``need_plan``) the structured coverage, from the first examples of ``x1``;
        reused while :func:`signature` is unchanged. The caller provides eval mode, a forked
        RNG and ``torch.no_grad``."""
        key = signature(fmodel, x1, n1)
        entry = self._entries.get(key)
        if entry is None:
            num_outputs = fmodel.output_size(slice_inputs(x1, 0, min(n1, 2)), min(n1, 2))
            entry = Analysis(num_outputs, profile_forward(fmodel, slice_inputs(x1, 0, 1), num_outputs))
        missing = [name for name in checks if name not in entry.checks]
        if missing:
            one = slice_inputs(x1, 0, 1)
            entry = dataclasses.replace(
                entry, checks={**entry.checks, **{name: check(name, fmodel, one) for name in missing}}
            )
        plan = None if entry.plan is None else _bind(entry.plan, fmodel.model)
        if need_plan and plan is None:
            plan = analyse(fmodel, x1, entry.num_outputs)
        # Entries refer to modules by path: a module replaced later is not kept alive.
        self._entries[key] = dataclasses.replace(entry, plan=None if plan is None else _detach(plan))
        self._entries.move_to_end(key)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
        return dataclasses.replace(entry, plan=plan)


def _detach(plan: StructuredPlan) -> StructuredPlan:
    """A copy of a plan that refers to modules by path only."""
    calls = {k: dataclasses.replace(c, module=None) for k, c in plan.calls.items()}
    return dataclasses.replace(plan, calls=calls)


def _bind(plan: StructuredPlan, model: nn.Module) -> StructuredPlan:
    """A plan of :func:`_detach` with its modules looked up in ``model`` again (function
    calls refer to no module)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = {
        k: c if c.function is not None else dataclasses.replace(c, module=modules[k[0]])
        for k, c in plan.calls.items()
    }
    return dataclasses.replace(plan, calls=calls)
