"""Wide networks behave as theory says: the kernel and the linearised prediction become
exact as width grows (Jacot et al. 2018; Lee et al. 2019).

For an MLP in NTK parametrisation trained full batch with MSE, the relative change of the
kernel during training and the gap between the predicted and actual loss both shrink as
a power of the width. Lee et al. 2019 bound the kernel change by O(width^-1/2); for
smooth activations and full-batch gradient descent the change is O(width^-1) (Dyer &
Gur-Ari 2019, "Asymptotics of wide networks from Feynman diagrams"), which is what is
measured here (slope about -1). The test asserts a slope between those two rates.
"""

import numpy as np
import pytest
import torch
from torch import nn

import ntk_torch as ntk

WIDTHS = (64, 256, 1024)
STEPS = 50
LR = 1.0


def train_and_compare(width, seed, x, y):
    model = ntk.models.MLP(4, 1, width=width, depth=2, activation="tanh", parametrization="ntk", seed=seed)
    model = model.double()
    k0 = ntk.empirical_ntk(model, x)
    with torch.no_grad():
        f0 = model(x)
    predicted = ntk.predict.gd(k0, y, f0, lr=LR, steps=STEPS, loss="mse", record_steps=[STEPS])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        actual = nn.functional.mse_loss(model(x), y).item()
        initial = nn.functional.mse_loss(f0, y).item()
    kernel_change = ntk.metrics.relative_change(ntk.empirical_ntk(model, x), k0)
    gap = abs(actual - predicted.train_loss[-1].item()) / initial
    return kernel_change, gap, actual / initial


def loglog_slope(widths, values):
    return np.polyfit(np.log(widths), np.log(values), 1)[0]


@pytest.fixture(scope="module")
def measurements():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    rows = []
    for width in WIDTHS:
        runs = np.array([train_and_compare(width, seed, x, y) for seed in range(2)])
        rows.append(runs.mean(axis=0))
    return np.array(rows)  # (widths, [kernel change, gap, loss ratio])


@pytest.mark.slow
def test_training_makes_progress_at_every_width(measurements):
    assert (measurements[:, 2] < 0.2).all()  # the loss fell by more than 5x


@pytest.mark.slow
def test_kernel_change_shrinks_with_width(measurements):
    changes = measurements[:, 0]
    assert (np.diff(changes) < 0).all()
    slope = loglog_slope(WIDTHS, changes)
    assert -1.25 < slope < -0.4, slope


@pytest.mark.slow
def test_linearisation_gap_shrinks_with_width(measurements):
    gaps = measurements[:, 1]
    assert (np.diff(gaps) < 0).all()
    assert loglog_slope(WIDTHS, gaps) < -0.4
    assert gaps[-1] < 0.01  # at width 1024 the prediction is within 1% of the initial loss
