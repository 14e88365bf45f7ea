"""sketch=d: (J S)(J S)^T with a seeded Gaussian projection, unbiased, error ~ 1/sqrt(d)."""

import pytest
import torch
from torch import nn

import ntk_torch as ntk

from zoo import make_zoo


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 2))


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_sketch_mean_over_seeds_converges_to_the_exact_kernel():
    model = _model()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    exact = ntk.empirical_ntk(model, x, mode="full", dtype=torch.float64)
    sketches = [ntk.empirical_ntk(model, x, mode="full", dtype=torch.float64, sketch=16, sketch_seed=s)
                for s in range(40)]
    single = sum(_relative(k, exact) for k in sketches[:10]) / 10
    mean = torch.stack(sketches).mean(0)
    assert _relative(mean, exact) < single / 3  # 40 seeds: about 1/sqrt(40) of one sketch's error
    assert _relative(torch.stack(sketches[:4]).mean(0), exact) > _relative(mean, exact) * 0.9


def test_sketch_error_falls_as_one_over_sqrt_d():
    model = _model()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    exact = ntk.empirical_ntk(model, x, mode="trace", dtype=torch.float64)

    def error(d):
        return sum(_relative(ntk.empirical_ntk(model, x, mode="trace", dtype=torch.float64, sketch=d,
                                               sketch_seed=s), exact) for s in range(8)) / 8

    small, large = error(8), error(128)
    assert 2.0 < small / large < 8.0  # sqrt(128 / 8) = 4


def test_sketch_is_seeded_symmetric_and_matches_the_cross_kernel():
    case = make_zoo()["residual"]
    x1, x2 = case.make_inputs(4, 0), case.make_inputs(3, 1)
    common = dict(mode="trace", dtype=torch.float64, sketch=32, sketch_seed=5)
    same = ntk.empirical_ntk(case.model, x1, **common)
    assert torch.equal(same, ntk.empirical_ntk(case.model, x1, **common))
    assert torch.equal(same, same.T)
    both = torch.cat([x1, x2])
    joint = ntk.empirical_ntk(case.model, both, **common)
    cross = ntk.empirical_ntk(case.model, x1, x2, **common)
    assert torch.allclose(cross, joint[:4, 4:], rtol=1e-10, atol=1e-12)
    diag = ntk.empirical_ntk(case.model, x1, mode="diagonal", dtype=torch.float64, sketch=32, sketch_seed=5)
    assert torch.allclose(diag.sum(-1), same, rtol=1e-10, atol=1e-12)
    other = ntk.empirical_ntk(case.model, x1, mode="trace", dtype=torch.float64, sketch=32, sketch_seed=6)
    assert not torch.allclose(other, same)


def test_sketch_errors():
    model = _model()
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="sketch must be a positive int"):
        ntk.empirical_ntk(model, x, sketch=0)
    with pytest.raises(ValueError, match="sketch_seed must be a non-negative int"):
        ntk.empirical_ntk(model, x, sketch=4, sketch_seed=-1)
    with pytest.raises(ValueError, match="sketch does not combine with per_layer"):
        ntk.empirical_ntk(model, x, sketch=4, per_layer=True)
