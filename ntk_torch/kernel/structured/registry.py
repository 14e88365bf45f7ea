"""The rule registries: one small rule per module type or torch function, looked up by the
structured engine.

**Module rules** (:class:`Rule`) have two halves:

* ``record(module, args, output)`` runs inside the module's forward (so ``module``'s
  tensors are the ones the kernel differentiates, in the compute dtype) and keeps what the
  rule needs from one call: the input, or the normalised input of a norm layer;
* ``terms(module, recorded, cotangent)`` runs afterwards on a block of ``n`` examples with
  ``recorded`` batched on dim 0 and the cotangent ``(n, O, *output feature shape)`` of
  the call's output, and returns ``{parameter attribute: term}`` (see
  :mod:`.terms`). Terms of one call that share the cotangent object (a weight and its
  bias) are fused by the engine into one Kronecker term.

Module rules are looked up by module type (:func:`rule_for`), or by the import path of a
class (``"transformers.pytorch_utils.Conv1D"``), so a rule for a class of an optional
library is registered without importing it; a subclass that overrides ``forward`` does
not inherit its parent's rule. ``applies(module)`` returns why a rule does not apply to a
particular instance (e.g. BatchNorm on batch statistics), or None.

**Function rules** (:class:`FunctionRule`) are the same two halves for one call of a torch
function with a parameter among the arguments named by its ``roles`` (``F.linear``'s
``weight`` and ``bias``), wherever the call happens (inside ``F.multi_head_attention_forward``,
in a parent's ``forward``); they are seen through a ``TorchFunctionMode`` (:mod:`.calls`).
``record(call)`` gets the call's arguments by name (live tensors, under the capture's
transforms); ``terms(spec, recorded, cotangent)`` gets a :class:`CallSpec` (the call's
non-tensor arguments and the per-example shapes of its tensors, no tensors) instead of a
module.

A rule whose ``batched`` is False treats every leading dimension of its call as positions
(``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``), so the call need not be batched on
dim 0: a position embedding looked up with ids shared by every example is covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from .terms import Term


Recorder = Callable[[nn.Module, Tuple, torch.Tensor], Any]
TermsFn = Callable[[nn.Module, Any, torch.Tensor], Dict[str, Term]]


@dataclass(frozen=True)
class Rule:
    """How the parameters ``roles`` of a ``module_type`` contribute (see module docstring)."""

    name: str
    module_type: Union[Type[nn.Module], str]
    roles: Tuple[str, ...]
    record: Recorder
    terms: TermsFn
    applies: Callable[[nn.Module], Optional[str]]
    batched: bool = True


RULES: Dict[Type[nn.Module], Rule] = {}
RULES_BY_PATH: Dict[str, Rule] = {}


def record_input(module: nn.Module, args: Tuple, output: torch.Tensor) -> torch.Tensor:
    """A rule's default record: the call's first positional input."""
    return args[0]


def _always(target: Any) -> Optional[str]:
    return None


def class_path(cls: type) -> str:
    """``"package.module.Class"``: the import path a rule may be registered under."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_key(module_type: Union[Type[nn.Module], str]) -> Tuple[Dict, Any, str]:
    """``(registry, key, display name)`` of a module type or an import path."""
    if isinstance(module_type, str):
        if "." not in module_type.strip("."):
            raise TypeError(
                f"module_types must hold nn.Module subclasses or import paths like "
                f"'package.module.Class', got {module_type!r}"
            )
        return RULES_BY_PATH, module_type, module_type
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_types must hold nn.Module subclasses, got {module_type!r}")
    return RULES, module_type, module_type.__name__


def register_rule(
    module_types: Sequence[Union[Type[nn.Module], str]],
    *,
    roles: Sequence[str] = ("weight", "bias"),
    record: Recorder = record_input,
    applies: Callable[[nn.Module], Optional[str]] = _always,
    batched: bool = True,
    overwrite: bool = False,
) -> Callable[[TermsFn], TermsFn]:
    """Decorator registering ``terms`` as the rule for each of ``module_types``.

    Args:
        module_types: the module classes the rule is for (subclasses that keep the
            class's ``forward`` inherit it), or their import paths
            (``"transformers.pytorch_utils.Conv1D"``): matched by name when such a module
            is first seen, so the library is never imported for it.
        roles: the parameter attributes the rule covers; others fall back to Jacobian
            contraction.
        record: what to keep from each call, ``record(module, args, output)`` (default the
            first positional input): a Tensor or a tuple of Tensors.
        applies: ``applies(module)`` is None when the rule is exact for that instance,
            else the reason it is not (shown by ``explain``).
        batched: the rule reads dim 0 of the call's input as the batch (True, the safe
            default); False when it treats every leading dimension as positions, so calls
            on inputs shared by every example are covered too.
        overwrite: replace an existing rule for one of ``module_types``; without it that is
            an error (rules are exactness-critical, so nothing is replaced silently).

    Raises:
        TypeError: a module type is neither an ``nn.Module`` subclass nor an import path,
            or ``roles`` is empty.
        ValueError: a module type has a rule already and ``overwrite`` is False.
    """
    keys = [_module_key(module_type) for module_type in module_types]
    for registry, key, shown in keys:
        if key in registry and not overwrite:
            raise ValueError(
                f"{shown} has a rule already ({registry[key].name}); pass overwrite=True to replace it"
            )
    roles = _checked_roles(roles)

    def decorate(terms: TermsFn) -> TermsFn:
        for registry, key, _ in keys:
            registry[key] = Rule(terms.__name__, key, roles, record, terms, applies, bool(batched))
        return terms

    return decorate


def _checked_roles(roles: Sequence[str]) -> Tuple[str, ...]:
    roles = tuple(roles)
    if not roles or not all(isinstance(role, str) for role in roles):
        raise TypeError(f"roles must name at least one parameter attribute, got {roles!r}")
    return roles


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule of ``module``'s type, or of the nearest registered base class whose
    ``forward`` it does not override (by type, else by import path)."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is None:
            rule = RULES_BY_PATH.get(class_path(cls))
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None


# ---------------------------------------------------------------------------------------
# Function rules
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CallSpec:
    """One call of a rule's function, without its tensors: what ``terms`` may read.

    Attributes:
        values: the call's arguments that are not tensors, by name (defaults omitted).
        shapes: per-example shapes (batch dim of 1 included) of its tensor arguments.
        output_shape: per-example shape of its output.
        params: the roles holding parameters of the model.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    shapes: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)
    output_shape: Tuple[int, ...] = ()
    params: Tuple[str, ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        """A non-tensor argument, or ``default`` when it was not passed."""
        return self.values.get(name, default)

    def shape(self, name: str) -> Optional[Tuple[int, ...]]:
        """The per-example shape of a tensor argument, None when it is not a tensor."""
        return self.shapes.get(name)


CallRecorder = Callable[[Mapping[str, Any]], Any]
FunctionTermsFn = Callable[[CallSpec, Any, torch.Tensor], Dict[str, Term]]


@dataclass(frozen=True)
class FunctionRule:
    """How a parameter passed to a torch function as one of ``roles`` contributes."""

    name: str
    functions: Tuple[Callable, ...]
    arguments: Tuple[str, ...]
    roles: Tuple[str, ...]
    record: CallRecorder
    terms: FunctionTermsFn
    applies: Callable[[Mapping[str, Any]], Optional[str]]
    batched: bool = True

    def bind(self, args: Tuple, kwargs: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The call's arguments by name, or None when they do not fit ``arguments`` (or the
        call writes into ``out=``, whose tensor a probe could not follow)."""
        if len(args) > len(self.arguments) or "out" in kwargs:
            return None
        bound = dict(zip(self.arguments, args))
        for name, value in kwargs.items():
            if name in bound:
                return None
            bound[name] = value
        return bound


FUNCTION_RULES: Dict[Callable, FunctionRule] = {}


def _first_argument(call: Mapping[str, Any]) -> Any:
    return call["input"]


def register_function_rule(
    functions: Sequence[Callable],
    *,
    arguments: Sequence[str],
    roles: Sequence[str],
    record: CallRecorder = _first_argument,
    applies: Callable[[Mapping[str, Any]], Optional[str]] = _always,
    batched: bool = True,
    name: Optional[str] = None,
    overwrite: bool = False,
) -> Callable[[FunctionTermsFn], FunctionTermsFn]:
    """Decorator registering ``terms`` as the rule for calls of each of ``functions``.

    A parameter passed as one of ``roles`` (and nowhere else in the call) is covered at
    that call, wherever it happens: in any module's ``forward``, or inside a Python-level
    torch function such as ``F.multi_head_attention_forward``.

    Args:
        functions: the torch functions, as torch hands them to ``__torch_function__``:
            ``torch.nn.functional.linear``, ``torch.matmul`` and ``torch.Tensor.matmul``
            (what ``x @ W`` calls), ``torch.Tensor.add`` (``x + p``), ...
        arguments: the names of the functions' positional arguments, in order (for a
            tensor method the first is ``self``'s); keyword arguments keep their names.
        roles: the arguments that may be parameters of the model.
        record: what to keep from each call, ``record(call)`` with the arguments by name
            (default ``call["input"]``): a Tensor or a tuple of Tensors.
        applies: ``applies(call)`` is None when the rule is exact for that call, else the
            reason it is not (the parameter falls back, and ``explain`` says why).
        batched: as for :func:`register_rule`.
        name: shown by ``explain`` (default the name of ``terms``).
        overwrite: replace an existing rule for one of ``functions``.

    Raises:
        TypeError: a function is not callable, or ``roles`` is empty or names something
            that is not in ``arguments``.
        ValueError: a function has a rule already and ``overwrite`` is False.
    """
    functions = tuple(functions)
    for function in functions:
        if not callable(function):
            raise TypeError(f"functions must hold torch functions, got {function!r}")
        if function in FUNCTION_RULES and not overwrite:
            shown = getattr(function, "__qualname__", repr(function))
            raise ValueError(
                f"{shown} has a rule already ({FUNCTION_RULES[function].name}); pass "
                "overwrite=True to replace it"
            )
    arguments = tuple(arguments)
    roles = _checked_roles(roles)
    missing = [role for role in roles if role not in arguments]
    if missing:
        raise TypeError(f"roles {missing} are not among arguments {arguments}")

    def decorate(terms: FunctionTermsFn) -> FunctionTermsFn:
        rule = FunctionRule(
            name or terms.__name__, functions, arguments, roles, record, terms, applies, bool(batched)
        )
        for function in functions:
            FUNCTION_RULES[function] = rule
        return terms

    return decorate


def function_rule_for(function: Callable) -> Optional[FunctionRule]:
    """The rule registered for ``function``, or None."""
    try:
        return FUNCTION_RULES.get(function)
    except TypeError:  # an unhashable callable
        return None
