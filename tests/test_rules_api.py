"""The public rule API of the structured engine: a user's rule, and no silent replacement."""

import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch.kernel import rules


class Scaled(nn.Module):
    """``y = 3 x W^T``: a linear layer the built-in rules do not know."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))

    def forward(self, x):
        return 3.0 * x @ self.weight.T


@pytest.fixture
def scaled_rule():
    @rules.register_rule([Scaled], roles=("weight",))
    def scaled(module, x, cotangent):
        n, o = cotangent.shape[:2]
        features = rules.DenseFeatures(3.0 * x.reshape(n, 1, -1, module.weight.shape[1]))
        return {"weight": rules.KroneckerTerm(features, cotangent.reshape(n, o, 1, -1, module.weight.shape[0]))}

    yield scaled
    del rules.RULES[Scaled]


def test_a_users_rule_is_exact_and_used(scaled_rule):
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    report = ntk.kernel.explain(model, x, method="structured")
    assert "0.weight" in report.covered and not report.fallback
    for mode in ntk.kernel.MODES:
        structured = ntk.empirical_ntk(model, x, mode=mode, method="structured")
        jacobian = ntk.empirical_ntk(model, x, mode=mode, method="jacobian")
        torch.testing.assert_close(structured, jacobian, rtol=1e-10, atol=1e-12)


def test_a_rule_is_never_replaced_silently(scaled_rule):
    with pytest.raises(ValueError, match="Scaled has a rule already .*overwrite=True"):
        rules.register_rule([Scaled], roles=("weight",))(lambda module, x, cotangent: {})
    with pytest.raises(ValueError, match="Linear has a rule already"):
        rules.register_rule([nn.Linear])(lambda module, x, cotangent: {})
    original = rules.RULES[Scaled]

    @rules.register_rule([Scaled], roles=("weight",), overwrite=True)
    def replacement(module, x, cotangent):
        return original.terms(module, x, cotangent)

    assert rules.RULES[Scaled].terms is replacement


def test_bad_registrations_name_the_argument():
    with pytest.raises(TypeError, match="module_types must hold nn.Module subclasses"):
        rules.register_rule([int])
    with pytest.raises(TypeError, match="roles must name at least one parameter attribute"):
        rules.register_rule([Scaled], roles=())


def test_the_built_in_models_register_their_rule_like_a_user():
    from ntk_torch.models import NTKLinear

    assert rules.rule_for(NTKLinear(3, 2)) is rules.RULES[NTKLinear]
    assert set(rules.__all__) >= {"DenseFeatures", "IndexFeatures", "KroneckerTerm", "GradientTerm", "register_rule"}
