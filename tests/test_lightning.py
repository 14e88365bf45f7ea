"""The Lightning callback: a real lightning.Trainer fit on CPU gives the records of a plain
loop with the same seed (also with gradient accumulation), logs them, and names the extra
when Lightning is missing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ntk_torch import load_run
from ntk_torch.tracker import NTKTracker

from _integration_helpers import assert_missing_library_names_the_extra, assert_records_match

FIELDS = ("relative_change", "kernel_distance", "param_distance", "probe_loss", "effective_rank")


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, generator=generator), torch.randn(16, 2, generator=generator)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def _plain_loop(steps, batch, accumulate):
    x, y = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, every=2, progress=False, forecast=None)
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    with tracker.attach(optimizer):
        for step in range(steps):
            optimizer.zero_grad()
            for micro in range(accumulate):
                bx, by = batches[(step * accumulate + micro) % len(batches)]
                (nn.functional.mse_loss(model(bx), by) / accumulate).backward()
            optimizer.step()
    return tracker.records


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_lightning_fit_records_what_a_plain_loop_records(tmp_path, accumulate):
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from ntk_torch.integrations.lightning import NTKCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            bx, by = batch
            return nn.functional.mse_loss(self(bx), by)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = _data()
    batch, steps = 4, 4
    callback = NTKCallback(train=(x, y), every=2, loss="mse", probe_size=8, forecast=None, run_dir=tmp_path / "run")
    trainer = lightning.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(tmp_path / "logs"), num_sanity_val_steps=0,
    )
    trainer.fit(Module(), DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False))

    expected = _plain_loop(steps, batch, accumulate)
    run = load_run(tmp_path / "run")
    assert_records_match(run, expected, FIELDS, [0, 2, 4], rel=1e-5, abs=1e-7)
    logged = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "ntk/relative_change" in logged.splitlines()[0]


def test_missing_lightning_names_the_extra(monkeypatch):
    assert_missing_library_names_the_extra(monkeypatch, "lightning", "ntk_torch.integrations.lightning", "lightning")
