"""The tracker's forecast is one configured problem: one eigendecomposition per run."""

import pytest
import torch
from torch import nn

from ntk_torch import records
from ntk_torch.forecast import LinearisedForecast
from ntk_torch.tracker import NTKTracker


@pytest.mark.slow
def test_a_400_step_run_decomposes_the_kernel_once(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def counting(matrix, *args, **kwargs):
        calls.append(tuple(matrix.shape))
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(40, 5), torch.randn(40, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(model, (x, y), test=(x[:10], y[:10]), loss="mse", probe_size=16, every=10,
                         progress=False)
    with tracker.attach(optimizer):
        for _ in range(400):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    assert isinstance(tracker.forecast, LinearisedForecast)
    assert len(tracker.records) == 41
    assert all(r[records.predicted("train")] is not None for r in tracker.records)
    assert calls == [(40 * 3, 40 * 3)]  # the forecast's full kernel, once (the closed form)
