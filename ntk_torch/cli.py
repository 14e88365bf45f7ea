"""The ``ntk-torch`` command: run, sweep, predict, plot, report, compare, bench.

Usage errors exit with status 2 (argparse's convention); errors in what the user gave
(an invalid config, an output directory that exists, a missing run) print one line,
``ntk-torch: error: ...``, without a traceback, and exit with status 2 as well. Ctrl-C
during training leaves a loadable run and exits with status 130.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from . import bench
from ._version import __version__
from .config import ConfigError, RunConfig, load_config, set_by_path

DEFAULT_RUNS_DIR = Path("runs")


class UserError(Exception):
    """An error in what the user asked for: reported in one line, no traceback."""


# --------------------------------------------------------------------------- helpers


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.set or ())


def _fresh_output(path: Path, force: bool) -> None:
    """Refuse to write into an existing non-empty directory unless ``force``."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UserError(f"{path} already exists; pass --force to replace it or --out to choose another directory")


def _print_table(rows: Sequence[Tuple[str, str]], title: Optional[str] = None) -> None:
    if title:
        print(title)
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _finish_run(run_dir: Path, config: RunConfig) -> List[Path]:
    """Figures and the HTML report of a finished run; prints the summary table."""
    from . import plots, report
    from .runs import load_run

    run = load_run(run_dir)
    figures = plots.save_all(run, run_dir / "figures")
    page = report.write_report(run, run_dir / "report.html", config=config)
    _print_table(report.summary_table(run), title=f"\n{config.name}: {run_dir}")
    print(f"  figures in {run_dir / 'figures'}, report {page}")
    return figures + [page]


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from . import experiment

    config = _config(args)
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / config.name
    _fresh_output(out, args.force)
    try:
        experiment.run(config, out, force=args.force, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nntk-torch: interrupted; the run recorded so far is in {out}", file=sys.stderr)
        return 130
    _finish_run(out, config)
    return 0


def _sweep_configs(config: RunConfig) -> List[Tuple[Any, List[RunConfig]]]:
    """``(value, [one config per seed])`` for each sweep value."""
    if config.sweep is None:
        raise UserError(f"config {config.name!r} has no sweep section (sweep: {{parameter: ..., values: [...]}})")
    parameter, seeds = config.sweep.parameter, config.sweep.seeds
    configs = []
    for value in config.sweep.values:
        swept = set_by_path(config, parameter, value, source=f"sweep {parameter}={value}")
        name = f"{config.name}-{parameter.rsplit('.', 1)[-1]}{value}"
        repeats = []
        for offset in range(seeds):
            repeat = set_by_path(swept, "seed", config.seed + offset) if offset else swept
            repeat.name = name if seeds == 1 else f"{name}-seed{config.seed + offset}"
            repeats.append(repeat)
        configs.append((value, repeats))
    return configs


def _final(run, column: str) -> float:
    """The last finite value of a run's column (NaN when there is none)."""
    last = run.last_finite(column)
    return math.nan if last is None else last[0]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import experiment

    config = _config(args)
    configs = _sweep_configs(config)
    parameter = config.sweep.parameter
    if args.predict_only:
        return _predict_sweep(configs, parameter)
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / config.name
    _fresh_output(out, args.force)
    results = []
    for value, repeats in configs:
        runs = [
            experiment.run(swept, out / swept.name, force=args.force, progress=not args.no_progress)
            for swept in repeats
        ]
        change = _mean([_final(run, "relative_change") for run in runs])
        gap = _mean([_final(run, "linearisation_gap") for run in runs])
        results.append((value, change, gap))
        over = f" (mean of {len(runs)} seeds)" if len(runs) > 1 else ""
        print(f"  {parameter}={value}: relative kernel change {_format(change)}, "
              f"linearisation gap {_format(gap)}{over}")
    _sweep_figure(results, out, parameter)
    return 0


def _sweep_figure(results, out: Path, parameter: str) -> None:
    from matplotlib.figure import Figure

    from . import plots

    numeric = [row for row in results if isinstance(row[0], (int, float))]
    rows = [("value", "relative change", "linearisation gap")] + [
        (str(v), _format(c), _format(g)) for v, c, g in results
    ]
    print(f"\nSweep over {parameter}:")
    for row in rows:
        print("  " + "  ".join(f"{cell:>18}" for cell in row))
    if len(numeric) >= 2:
        figure = Figure(figsize=(6.4, 4.8), layout="constrained")
        ax = figure.subplots()
        plots.width_sweep(numeric, ax)
        ax.set_xlabel(parameter)
        for fmt in ("png", "svg"):
            plots.save_figure(figure, out / f"sweep.{fmt}")
        for name, column in (("relative change", 1), ("linearisation gap", 2)):
            points = [(r[0], r[column]) for r in numeric if r[column] and r[column] > 0 and math.isfinite(r[column])]
            if len(points) >= 2:
                fit = plots.fit_loglog_slope(*zip(*points))
                print(f"  {name} ~ {parameter}^{fit.slope:.2f}")
        print(f"  figure: {out / 'sweep.png'}")


def _predict_sweep(configs, parameter: str) -> int:
    from . import experiment

    ranked = []
    for value, repeats in configs:
        forecasts = [experiment.forecast(swept, steps=[swept.train.steps]) for swept in repeats]
        rows = [f.rows[-1] for f in forecasts]
        row = {name: _mean([r[name] for r in rows]) if rows[0].get(name) is not None else None for name in rows[0]}
        score = row.get("predicted_test_accuracy")
        key = ("predicted_test_accuracy", score) if score is not None else ("predicted_test_loss", row["predicted_test_loss"])
        max_lr = _mean([f.max_learning_rate for f in forecasts])
        ranked.append((value, key, row, max_lr))
    by_accuracy = all(key[0] == "predicted_test_accuracy" for _, key, _, _ in ranked)
    ranked.sort(key=lambda item: (-item[1][1]) if by_accuracy else item[1][1])
    metric = "predicted test accuracy" if by_accuracy else "predicted test loss"
    seeds = len(configs[0][1])
    over = f", mean of {seeds} seeds" if seeds > 1 else ""
    print(f"Ranking by {metric} after {configs[0][1][0].train.steps} steps (no training{over}):")
    for place, (value, key, row, max_lr) in enumerate(ranked, start=1):
        print(
            f"  {place}. {parameter}={value}: {metric} {_format(key[1])}, predicted train loss "
            f"{_format(row['predicted_train_loss'])}, max stable lr {_format(max_lr)}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from . import experiment, plots

    config = _config(args)
    result = experiment.forecast(config)
    columns = [c for c in ("predicted_train_loss", "predicted_test_loss", "predicted_train_accuracy",
                           "predicted_test_accuracy") if any(row.get(c) is not None for row in result.rows)]
    print(f"{config.name}: what the kernel at initialisation predicts (before any training)")
    print("  " + f"{'step':>8}" + "".join(f"{c.replace('predicted_', ''):>16}" for c in columns))
    for step, row in zip(result.steps, result.rows):
        print("  " + f"{step:>8}" + "".join(f"{_format(row.get(c)):>16}" for c in columns))
    lr = config.train.lr
    max_lr = result.max_learning_rate
    print(f"  largest stable learning rate: {_format(max_lr)} (config lr {lr})")
    if max_lr is not None and lr > max_lr:
        print(f"  warning: train.lr={lr} is above the stable limit; the linearised model diverges")
    print(f"  kernel: {result.description['kernel_mode']} ({result.description['approximation']}), "
          f"{result.description['points']} training points")
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / f"{config.name}-predict"
    out.mkdir(parents=True, exist_ok=True)
    figure = plots.forecast_figure(result.steps, result.rows, title=f"{config.name}: predicted before training")
    for fmt in ("png", "svg"):
        plots.save_figure(figure, out / f"predicted.{fmt}")
    print(f"  figure: {out / 'predicted.png'}")
    return 0


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "meta.json").is_file():
        raise UserError(f"{run_dir} is not an ntk_torch run directory (no meta.json)")
    return run_dir


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plots

    run_dir = _run_dir(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "figures"
    paths = plots.save_all(run_dir, out, formats=args.formats.split(","))
    print(f"{len(paths)} figures written to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report

    run_dir = _run_dir(args.run_dir)
    config_file = run_dir / "config.yaml"
    config = load_config(config_file) if config_file.is_file() else None
    print(report.write_report(run_dir, args.out, config=config))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import plots

    run_dirs = [_run_dir(path) for path in args.run_dirs]
    if args.labels and len(args.labels) != len(run_dirs):
        raise UserError(f"--labels gives {len(args.labels)} labels for {len(run_dirs)} runs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = plots.compare(run_dirs, labels=args.labels)
    paths = [plots.save_figure(figure, out / f"compare.{fmt}") for fmt in ("png", "svg")]
    print(f"comparison of {len(run_dirs)} runs: {paths[0]}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    bench.run(args)
    return 0


# --------------------------------------------------------------------------- parser


def _add_config_options(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("config", help="a YAML config file (see configs/)")
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.05 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-torch",
        description="Training dynamics of PyTorch models through the empirical Neural Tangent Kernel.",
    )
    parser.add_argument("--version", action="version", version=f"ntk-torch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="train a config with the tracker; write the run, figures and report",
                              description="Train the config's model with the NTK tracker attached; write the run "
                              "directory, figures and report.html, and print a summary.")
    _add_config_options(run, "output directory (default runs/<config name>)")
    run.add_argument("--force", action="store_true", help="replace an existing output directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(handler=cmd_run)

    sweep = commands.add_parser("sweep", help="run a config over its sweep values (e.g. widths)",
                                description="Run the config for each value of its sweep section (sweep.seeds "
                                "runs per value, averaged) and draw kernel drift and linearisation gap against the "
                                "swept value (log-log, fitted slopes).")
    _add_config_options(sweep, "output directory (default runs/<config name>)")
    sweep.add_argument("--force", action="store_true", help="replace an existing output directory")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.add_argument("--predict-only", action="store_true",
                       help="no training: rank the sweep values by predicted test accuracy (or loss)")
    sweep.set_defaults(handler=cmd_sweep)

    predict = commands.add_parser("predict", help="predict the training curve from the kernel at initialisation",
                                  description="Before any training: the linearised model's predicted train and test "
                                  "curves and the largest stable learning rate.")
    _add_config_options(predict, "where to write the figure (default runs/<config name>-predict)")
    predict.set_defaults(handler=cmd_predict)

    plot = commands.add_parser("plot", help="draw every figure of a run", description="Draw every figure a run supports.")
    plot.add_argument("run_dir", help="a run directory")
    plot.add_argument("--out", help="figure directory (default RUN_DIR/figures)")
    plot.add_argument("--formats", default="png,svg", help="comma-separated file formats (default png,svg)")
    plot.set_defaults(handler=cmd_plot)

    report = commands.add_parser("report", help="write a run's self-contained HTML report",
                                 description="Write report.html: summary, figures, config and model of a run.")
    report.add_argument("run_dir", help="a run directory")
    report.add_argument("--out", help="the HTML file (default RUN_DIR/report.html)")
    report.set_defaults(handler=cmd_report)

    compare = commands.add_parser("compare", help="overlay several runs", description="Overlay several runs' drift, "
                                  "velocity, alignment and linearisation gap in one figure.")
    compare.add_argument("run_dirs", nargs="+", help="run directories")
    compare.add_argument("--out", default="compare", help="output directory (default ./compare)")
    compare.add_argument("--labels", nargs="+", help="one legend label per run")
    compare.set_defaults(handler=cmd_compare)

    bench.build_parser(
        commands.add_parser("bench", help="time each kernel engine and mode (markdown table)",
                            description=bench.__doc__.split("\n")[0])
    ).set_defaults(handler=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UserError, ConfigError, FileExistsError, FileNotFoundError) as error:
        print(f"ntk-torch: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # runs already written stay loadable
        print("\nntk-torch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
