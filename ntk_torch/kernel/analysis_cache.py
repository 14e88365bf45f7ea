"""A per-model cache of what ``empirical_ntk`` measures before computing a kernel.

Before the first block, ``empirical_ntk`` runs a few forward passes on one or two examples:
the output size ``O``, the :class:`~.cost.ForwardProfile` (FLOPs, activation bytes) and,
for the structured engine, the coverage analysis (:func:`.structured.analyse`). None of
them depends on parameter *values* -- only on what the forward does with which tensors --
so they are kept per model and reused while the model's structure, its tensors' identity
and the inputs' feature shapes stay the same. This matters for small models and for the
tracker, which measures the same probe set every few steps while the optimizer updates
the parameters in place.

The key (:func:`signature`) covers everything the measurements read:

* every module path with the module's identity and type, its configuration
  (``extra_repr()``), an instance-level ``forward`` override and its hooks, plus torch's
  global module hooks;
* every parameter and buffer: name, identity, shape, dtype, device and ``requires_grad``
  (so swapping in a new tensor, resizing one or freezing one invalidates the entry);
* the selected parameters, the compute dtype and ``output_fn``;
* the inputs' structure, feature shapes (all but the batch dimension), dtypes and devices,
  and ``min(N, 2)`` (the analysis looks at one and two examples).

Entries hold no tensors and no strong reference to the model (modules are referred to by
path and rebound on use), the cache holds the model weakly, and each model keeps at most
:data:`MAX_ENTRIES` entries. :func:`clear_cache` empties it (e.g. after changing a custom
module's behaviour through an attribute that ``extra_repr`` does not show).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from typing import Any, Dict, Hashable, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..functional import FunctionalModel, Inputs, input_tensors

MAX_ENTRIES = 4

_CACHE: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget every cached analysis."""
    _CACHE.clear()


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
    structure = type(x).__name__ if not isinstance(x, dict) else ("dict", tuple(x))
    return (
        tuple(modules), params, buffers, tuple(fmodel.params), fmodel.dtype, _callable_key(fmodel.output_fn),
        structure, inputs, min(n, 2), _global_hooks(),
    )


def lookup(model: nn.Module, key: Hashable) -> Optional[Dict[str, Any]]:
    entries = _CACHE.get(model)
    if entries is None or key not in entries:
        return None
    entries.move_to_end(key)
    return entries[key]


def store(model: nn.Module, key: Hashable, entry: Dict[str, Any]) -> None:
    entries = _CACHE.setdefault(model, OrderedDict())
    entries[key] = entry
    entries.move_to_end(key)
    while len(entries) > MAX_ENTRIES:
        entries.popitem(last=False)


def detach_plan(plan):
    """A copy of a :class:`~.structured.StructuredPlan` that refers to modules by path."""
    calls = {k: dataclasses.replace(c, module=None) for k, c in plan.calls.items()}
    return dataclasses.replace(plan, calls=calls)


def bind_plan(plan, model: nn.Module):
    """The plan of :func:`detach_plan` with its modules looked up in ``model`` again."""
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = {k: dataclasses.replace(c, module=modules[k[0]]) for k, c in plan.calls.items()}
    return dataclasses.replace(plan, calls=calls)
