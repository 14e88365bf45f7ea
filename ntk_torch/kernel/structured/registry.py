"""The rule registry: one small rule per module type, looked up by the structured engine.

A :class:`Rule` has two halves:

* ``record(module, args, output)`` runs inside the module's forward (so ``module``'s
  tensors are the ones the kernel differentiates, in the compute dtype) and keeps what the
  rule needs from one call: the input, or the normalised input of a norm layer;
* ``terms(module, recorded, cotangent)`` runs afterwards on a block of ``n`` examples with
  ``recorded`` batched on dim 0 and the cotangent ``(n, O, *output feature shape)`` of
  the call's output, and returns ``{parameter attribute: term}`` (see
  :mod:`.terms`). Terms of one call that share the cotangent object (a weight and its
  bias) are fused by the engine into one Kronecker term.

Rules are looked up by module type (:func:`rule_for`); a subclass that overrides
``forward`` does not inherit its parent's rule. ``applies(module)`` returns why a rule
does not apply to a particular instance (e.g. BatchNorm on batch statistics), or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .terms import Term


Recorder = Callable[[nn.Module, Tuple, torch.Tensor], torch.Tensor]
TermsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Dict[str, Term]]


@dataclass(frozen=True)
class Rule:
    """How the parameters ``roles`` of a ``module_type`` contribute (see module docstring)."""

    name: str
    module_type: Type[nn.Module]
    roles: Tuple[str, ...]
    record: Recorder
    terms: TermsFn
    applies: Callable[[nn.Module], Optional[str]]


RULES: Dict[Type[nn.Module], Rule] = {}


def _input(module: nn.Module, args: Tuple, output: torch.Tensor) -> torch.Tensor:
    return args[0]


def _always(module: nn.Module) -> Optional[str]:
    return None


def register_rule(
    module_types: Sequence[Type[nn.Module]],
    *,
    roles: Sequence[str] = ("weight", "bias"),
    record: Recorder = _input,
    applies: Callable[[nn.Module], Optional[str]] = _always,
    overwrite: bool = False,
) -> Callable[[TermsFn], TermsFn]:
    """Decorator registering ``terms`` as the rule for each of ``module_types``.

    Args:
        module_types: the module classes the rule is for (subclasses that keep the
            class's ``forward`` inherit it).
        roles: the parameter attributes the rule covers; others fall back to Jacobian
            contraction.
        record: what to keep from each call, ``record(module, args, output)`` (default the
            first positional input).
        applies: ``applies(module)`` is None when the rule is exact for that instance,
            else the reason it is not (shown by ``explain``).
        overwrite: replace an existing rule for one of ``module_types``; without it that is
            an error (rules are exactness-critical, so nothing is replaced silently).

    Raises:
        TypeError: a module type is not an ``nn.Module`` subclass, or ``roles`` is empty.
        ValueError: a module type has a rule already and ``overwrite`` is False.
    """
    module_types = tuple(module_types)
    for module_type in module_types:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"module_types must hold nn.Module subclasses, got {module_type!r}")
        if module_type in RULES and not overwrite:
            raise ValueError(
                f"{module_type.__name__} has a rule already ({RULES[module_type].name}); pass "
                "overwrite=True to replace it"
            )
    roles = tuple(roles)
    if not roles or not all(isinstance(role, str) for role in roles):
        raise TypeError(f"roles must name at least one parameter attribute, got {roles!r}")

    def decorate(terms: TermsFn) -> TermsFn:
        for module_type in module_types:
            RULES[module_type] = Rule(terms.__name__, module_type, roles, record, terms, applies)
        return terms

    return decorate


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule of ``module``'s type, or of the nearest registered base class whose
    ``forward`` it does not override."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None


