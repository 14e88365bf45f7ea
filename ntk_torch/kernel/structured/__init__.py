"""Structured derivatives: the eNTK from what flows through each layer.

Novak, Sohl-Dickstein & Schoenholz 2022 ("Fast finite width neural tangent kernel")
observe that a layer's contribution to the kernel can be computed from its inputs and the
cotangents of its outputs, without forming per-example Jacobians. This package holds

* :mod:`.registry` -- the rule registry (public as :mod:`ntk_torch.kernel.rules`);
* :mod:`.rules` -- the built-in rules, one small rule per module type (``nn.Linear``,
  ``nn.Conv1d/2d/3d``, ``nn.Embedding``, the affine parameters of ``nn.LayerNorm``/
  ``nn.GroupNorm``/``nn.BatchNorm*d``);
* :mod:`.terms` -- the two term forms (Kronecker-factored, explicit gradients), their
  contractions in each kernel mode and the cost model choosing between strategies;
* :mod:`.plan` -- which parameters the rules cover exactly (the rest fall back to
  Jacobian contraction) and the one-pass capture of inputs and output cotangents;
* :mod:`.engine` -- :class:`StructuredEngine`, behind ``empirical_ntk(method="structured")``.

:mod:`ntk_torch.kernel.explain` reports the decisions in a readable table.
"""

from . import rules as _builtin_rules  # noqa: F401  (registers the built-in rules)
from .engine import StructuredEngine, structured_cost
from .plan import StructuredPlan, analyse
from .registry import RULES, Rule, register_rule, rule_for

__all__ = [
    "RULES",
    "Rule",
    "StructuredEngine",
    "StructuredPlan",
    "analyse",
    "register_rule",
    "rule_for",
    "structured_cost",
]
