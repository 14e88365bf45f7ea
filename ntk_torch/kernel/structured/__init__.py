"""Structured derivatives: the eNTK from what flows through each layer.

Novak, Sohl-Dickstein & Schoenholz 2022 ("Fast finite width neural tangent kernel")
observe that a layer's contribution to the kernel can be computed from its inputs and the
cotangents of its outputs, without forming per-example Jacobians. This package holds

* :mod:`.registry` -- the rule registries, of module rules and of function rules (public
  as :mod:`ntk_torch.kernel.rules`);
* :mod:`.rules` -- the built-in module rules (``nn.Linear``, ``nn.Conv1d/2d/3d``,
  ``nn.ConvTranspose1d/2d/3d``, ``nn.Embedding``, Hugging Face's ``Conv1D``, the affine
  parameters of ``nn.LayerNorm``/``nn.RMSNorm``/``nn.GroupNorm``/``nn.BatchNorm*d``);
* :mod:`.functions` -- the built-in function rules (``F.linear``, ``torch.addmm``,
  ``x @ W``, ``F.layer_norm``/``rms_norm``/``group_norm``, ``F.embedding``,
  ``F.embedding_bag``, ``F.conv_transpose*``, element-wise ``add``/``sub``/``mul``);
* :mod:`.layers` -- the Jacobian structure of each layer kind, shared by both;
* :mod:`.terms` -- the two term forms (Kronecker-factored, explicit gradients), their
  contractions in each kernel mode and the cost model choosing between strategies;
* :mod:`.calls` -- where parameters are used: module hooks, and the ``TorchFunctionMode``
  that sees torch function calls (inside Python-level torch functions too);
* :mod:`.plan` -- which parameters the rules cover exactly (the rest fall back to
  Jacobian contraction); :mod:`.capture` -- the one-pass capture of inputs and output
  cotangents, and the terms built from them;
* :mod:`.engine` -- :class:`StructuredEngine`, behind ``empirical_ntk(method="structured")``.

:mod:`ntk_torch.kernel.explain` reports the decisions in a readable table.
"""

from . import functions as _builtin_function_rules  # noqa: F401  (registers the built-in function rules)
from . import rules as _builtin_rules  # noqa: F401  (registers the built-in module rules)
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
