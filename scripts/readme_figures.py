"""Regenerate the figures of README.md into docs/figures/.

* ``quickstart_adam_loss.png``: the README's quickstart, run as written (Adam, minibatches
  of 64 shown to the tracker, 10 epochs of the digits): the network's loss against the
  linearised twin's.
* ``kernel_heatmaps.png``, ``predicted_vs_actual_loss.png``, ``drift.png``: the default run,
  ``configs/digits_mlp.yaml`` (minibatch SGD with momentum), as ``ntk-torch run`` draws them.

    python scripts/readme_figures.py [--out docs/figures] [--only quickstart|default]

Prints the numbers the README quotes beside the figures.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

import ntk_torch as ntk
from ntk_torch import experiment, plots
from ntk_torch.config import load_config
from ntk_torch.plots import save_figure

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIGURES = ("kernel_heatmaps", "predicted_vs_actual_loss", "drift")


def quickstart(run_dir: Path) -> ntk.Run:
    """The README's quickstart loop, line for line (seeded, writing to ``run_dir``)."""
    torch.manual_seed(0)
    split = ntk.data.digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = split.train

    tracker = ntk.NTKTracker(model, split.train, test=split.test, loss="cross_entropy",
                             every=20, run_dir=run_dir, progress=False)
    with tracker.attach(optimizer):
        for epoch in range(10):
            for batch in torch.randperm(len(x)).split(64):
                tracker.observe(x[batch], y[batch])
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
    return ntk.load_run(run_dir)


def summary(run: ntk.Run) -> None:
    last = run.records[-1]
    print(f"  {len(run)} measurements, last at step {last['step']} (final: {last.get('final', False)})")
    for field in ("train_loss", "predicted_train_loss", "test_loss", "predicted_test_loss",
                  "test_accuracy", "predicted_test_accuracy", "relative_change"):
        if field in last:
            print(f"  {field}: {last[field]:.4g}")
    print(f"  forecast: {run.meta.get('forecast')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--only", choices=("quickstart", "default"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        if args.only in (None, "quickstart"):
            run = quickstart(Path(directory) / "mine")  # runs/mine in the README
            ax = plots.predicted_vs_actual(run, metric="loss")
            print(save_figure(ax.figure, args.out / "quickstart_adam_loss.png"))
            summary(run)
        if args.only in (None, "default"):
            config = load_config(ROOT / "configs" / "digits_mlp.yaml")
            run = experiment.run(config, Path(directory) / config.name, progress=False)
            saved = plots.save_all(run, Path(directory) / "figures", formats=["png"])
            for path in saved:
                if path.stem in DEFAULT_FIGURES:
                    shutil.copy(path, args.out / path.name)
                    print(args.out / path.name)
            summary(run)


if __name__ == "__main__":
    main()
