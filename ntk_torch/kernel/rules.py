"""The public rule API of the structured engine: teach it a module type.

The structured engine (``method="structured"``) computes a layer's share of the kernel from
what flows through the layer (Novak, Sohl-Dickstein & Schoenholz 2022, "structured
derivatives"). A rule says how, for one module type::

    from ntk_torch.kernel import rules

    @rules.register_rule([MyLinear])
    def my_linear(module, x, cotangent):
        # x: the recorded input (n, ..., d_in); cotangent: (n, O, ..., d_out)
        n, o = cotangent.shape[:2]
        features = rules.DenseFeatures(x.reshape(n, 1, -1, module.in_features))
        u = cotangent.reshape(n, o, 1, -1, module.out_features)
        return {"weight": rules.KroneckerTerm(features, u)}

``terms(module, recorded, cotangent)`` returns ``{parameter attribute: term}``:

* :class:`KroneckerTerm` ``(features, cotangent)`` for a weight applied to features:
  ``J[i, a] = sum_t u[i, a, g, t] (x) v[i, g, t]`` with :class:`DenseFeatures`
  ``(n, g, T, d_in)`` or :class:`IndexFeatures` (one-hot tokens) and ``u`` of shape
  ``(n, O, g, T, d_out)``;
* :class:`GradientTerm` ``(grads)`` with explicit per-example gradients ``(n, O, p)``,
  laid out like the parameter.

A rule is exact or it must not apply: ``applies(module)`` returns why an instance is not
covered (its parameters then fall back to Jacobian contraction, and
``ntk_torch.kernel.explain`` says why). Every rule should be tested against
``empirical_ntk(..., method="jacobian")`` in float64. :func:`register_rule` refuses to
replace a registered rule unless ``overwrite=True``.
"""

from .structured.registry import RULES, Rule, register_rule, rule_for
from .structured.terms import DenseFeatures, GradientTerm, IndexFeatures, KroneckerTerm, Term

__all__ = [
    "RULES",
    "DenseFeatures",
    "GradientTerm",
    "IndexFeatures",
    "KroneckerTerm",
    "Rule",
    "Term",
    "register_rule",
    "rule_for",
]
