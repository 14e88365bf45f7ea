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


# ---------------------------------------------------------------------------------------
# Function rules, and module rules by import path
# ---------------------------------------------------------------------------------------

from torch.overrides import handle_torch_function, has_torch_function_variadic  # noqa: E402


def scaled_linear(input, weight):
    """``3 x W^T``: a torch function of the user's (it hands itself to __torch_function__)."""
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(scaled_linear, (input, weight), input, weight)
    return 3.0 * input @ weight.T


class UsesScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4))
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(scaled_linear(x, self.weight)))


@pytest.fixture
def scaled_function_rule():
    @rules.register_function_rule([scaled_linear], arguments=("input", "weight"), roles=("weight",))
    def scaled(spec, x, cotangent):
        d_out, d_in = spec.shape("weight")
        n, o = cotangent.shape[:2]
        features = rules.DenseFeatures(3.0 * x.reshape(n, 1, -1, d_in))
        return {"weight": rules.KroneckerTerm(features, cotangent.reshape(n, o, 1, -1, d_out))}

    yield scaled
    del rules.FUNCTION_RULES[scaled_linear]


def test_a_users_function_rule_is_exact_and_used(scaled_function_rule):
    torch.manual_seed(0)
    model = UsesScaledLinear().double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    report = ntk.kernel.explain(model, x, method="structured")
    assert not report.fallback
    assert [t.rule for t in report.terms if t.params == ("weight",)] == ["scaled"]
    for mode in ntk.kernel.MODES:
        structured = ntk.empirical_ntk(model, x, x[:4], mode=mode, method="structured")
        jacobian = ntk.empirical_ntk(model, x, x[:4], mode=mode, method="jacobian")
        torch.testing.assert_close(structured, jacobian, rtol=1e-10, atol=1e-12)


def test_without_a_function_rule_the_use_falls_back():
    torch.manual_seed(0)
    model = UsesScaledLinear().double()
    report = ntk.kernel.explain(model, torch.randn(3, 3, 4, dtype=torch.float64), method="structured")
    assert "used directly by" in report.fallback["weight"]


def test_a_function_rule_is_never_replaced_silently(scaled_function_rule):
    with pytest.raises(ValueError, match="scaled_linear has a rule already .*overwrite=True"):
        rules.register_function_rule([scaled_linear], arguments=("input", "weight"), roles=("weight",))(
            lambda spec, x, cotangent: {}
        )
    with pytest.raises(ValueError, match="linear has a rule already \\(F.linear\\)"):
        rules.register_function_rule([torch.nn.functional.linear], arguments=("input", "weight"), roles=("weight",))(
            lambda spec, x, cotangent: {}
        )
    original = rules.FUNCTION_RULES[scaled_linear]

    @rules.register_function_rule([scaled_linear], arguments=("input", "weight"), roles=("weight",), overwrite=True)
    def replacement(spec, x, cotangent):
        return original.terms(spec, x, cotangent)

    assert rules.function_rule_for(scaled_linear).terms is replacement


def test_bad_function_rule_registrations_name_the_argument():
    with pytest.raises(TypeError, match="functions must hold torch functions"):
        rules.register_function_rule([3], arguments=("input",), roles=("input",))
    with pytest.raises(TypeError, match="roles \\['bias'\\] are not among arguments"):
        rules.register_function_rule([scaled_linear], arguments=("input", "weight"), roles=("bias",))
    with pytest.raises(TypeError, match="roles must name at least one parameter attribute"):
        rules.register_function_rule([scaled_linear], arguments=("input", "weight"), roles=())
    with pytest.raises(TypeError, match="import paths like 'package.module.Class'"):
        rules.register_rule(["Scaled"])


def test_a_module_rule_registered_by_import_path_is_found_by_name():
    path = f"{Scaled.__module__}.{Scaled.__qualname__}"

    @rules.register_rule([path], roles=("weight",))
    def scaled_by_path(module, x, cotangent):
        n, o = cotangent.shape[:2]
        features = rules.DenseFeatures(3.0 * x.reshape(n, 1, -1, module.weight.shape[1]))
        return {"weight": rules.KroneckerTerm(features, cotangent.reshape(n, o, 1, -1, module.weight.shape[0]))}

    try:
        assert rules.rule_for(Scaled(3, 2)).terms is scaled_by_path
        with pytest.raises(ValueError, match="has a rule already"):
            rules.register_rule([path], roles=("weight",))(scaled_by_path)
        torch.manual_seed(0)
        model = nn.Sequential(Scaled(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        x = torch.randn(5, 4, dtype=torch.float64)
        assert ntk.kernel.explain(model, x, method="structured").terms[0].rule == "scaled_by_path"
        torch.testing.assert_close(
            ntk.empirical_ntk(model, x, method="structured"), ntk.empirical_ntk(model, x, method="jacobian"),
            rtol=1e-10, atol=1e-12,
        )
    finally:
        del rules.RULES_BY_PATH[path]


def test_the_public_api_names_function_rules():
    assert set(rules.__all__) >= {"register_function_rule", "CallSpec", "FUNCTION_RULES", "function_rule_for"}
    assert rules.function_rule_for(torch.nn.functional.linear).name == "F.linear"
    assert rules.rule_for(torch.nn.RMSNorm(4)).name == "rms_norm"
