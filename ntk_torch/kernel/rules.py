"""The public rule API of the structured engine: teach it a module type or a torch function.

The structured engine (``method="structured"``) computes a layer's share of the kernel from
what flows through the layer (Novak, Sohl-Dickstein & Schoenholz 2022, "structured
derivatives"). A **module rule** says how, for one module type::

    from ntk_torch.kernel import rules

    @rules.register_rule([MyLinear])
    def my_linear(module, x, cotangent):
        # x: the recorded input (n, ..., d_in); cotangent: (n, O, ..., d_out)
        n, o = cotangent.shape[:2]
        features = rules.DenseFeatures(x.reshape(n, 1, -1, module.in_features))
        u = cotangent.reshape(n, o, 1, -1, module.out_features)
        return {"weight": rules.KroneckerTerm(features, u)}

A class of an optional library may be named by its import path
(``register_rule(["transformers.pytorch_utils.Conv1D"])``): it is matched when such a
module is first seen, and the library is never imported for it.

A **function rule** says how, for calls of a torch function with a parameter among the
arguments named by ``roles`` -- wherever the call happens, also inside another torch
function (``F.multi_head_attention_forward`` applies its projections with ``F.linear``)::

    @rules.register_function_rule(
        [my_scaled_linear], arguments=("input", "weight"), roles=("weight",)
    )
    def scaled_linear(spec, x, cotangent):
        # spec.shape("weight") == (d_out, d_in); spec.get(name) reads other arguments
        d_out, d_in = spec.shape("weight")
        n, o = cotangent.shape[:2]
        features = rules.DenseFeatures(3.0 * x.reshape(n, 1, -1, d_in))
        return {"weight": rules.KroneckerTerm(features, cotangent.reshape(n, o, 1, -1, d_out))}

``my_scaled_linear`` must be a torch function (one that hands itself to
``__torch_function__``, as ``torch.nn.functional``'s do): the engine sees calls through a
``TorchFunctionMode``.

``terms`` returns ``{parameter attribute or role: term}``:

* :class:`KroneckerTerm` ``(features, cotangent, transposed=False)`` for a weight
  applied to features: ``J[i, a] = sum_t u[i, a, g, t] (x) v[i, g, t]`` with
  :class:`DenseFeatures` ``(n, g, T, d_in)`` or :class:`IndexFeatures` (one-hot tokens,
  optionally weighted) and ``u`` of shape ``(n, O, g, T, d_out)``; ``transposed`` for a
  weight laid out ``(d_in, d_out)``;
* :class:`GradientTerm` ``(grads)`` with explicit per-example gradients ``(n, O, p)``,
  laid out like the parameter.

A rule is exact or it must not apply: ``applies(module)`` (``applies(call)`` for a
function rule) returns why an instance or a call is not covered (its parameters then fall
back to Jacobian contraction, and ``ntk_torch.kernel.explain`` says why). A parameter is
covered only when every one of its uses is. Every rule should be tested against
``empirical_ntk(..., method="jacobian")`` in float64. :func:`register_rule` and
:func:`register_function_rule` refuse to replace a registered rule unless
``overwrite=True``.
"""

from .structured.registry import (
    FUNCTION_RULES,
    RULES,
    RULES_BY_PATH,
    CallSpec,
    FunctionRule,
    Rule,
    function_rule_for,
    register_function_rule,
    register_rule,
    rule_for,
)
from .structured.terms import DenseFeatures, GradientTerm, IndexFeatures, KroneckerTerm, Term

__all__ = [
    "FUNCTION_RULES",
    "RULES",
    "RULES_BY_PATH",
    "CallSpec",
    "DenseFeatures",
    "FunctionRule",
    "GradientTerm",
    "IndexFeatures",
    "KroneckerTerm",
    "Rule",
    "Term",
    "function_rule_for",
    "register_function_rule",
    "register_rule",
    "rule_for",
]
