"""The ``ntk-torch`` command: run, sweep, predict, plot, report, compare, bench.

Usage errors exit with status 2 (argparse's convention); errors in what the user gave
(an invalid config, an output directory that exists, a missing run) print one line,
``ntk-torch: error: ...``, without a traceback, and exit with status 2 as well. Ctrl-C
during training leaves a loadable run and exits with status 130.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from . import records
from ._version import __version__
from .config import ConfigError, RunConfig, load_config

if TYPE_CHECKING:  # the commands import experiment, and all it loads, only when they run
    from .experiment import Forecast, Ranking, SweepPoint, SweepResult

DEFAULT_RUNS_DIR = Path("runs")
RELATIVE_CHANGE, TRAIN_GAP = records.RELATIVE_CHANGE, records.gap(records.TRAIN)
SWEEP_LABELS = {RELATIVE_CHANGE: "relative change", TRAIN_GAP: "linearisation gap"}
"""The columns of the sweep table: record field -> heading."""
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
"""The repository's scripts/ beside the package: present in a checkout (an editable or
source install), absent from a wheel."""
BENCHMARK = "bench_ntk"


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
    """Train the config and write its figures and report; the exit status (130 on Ctrl-C)."""
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


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train the sweep (or rank it by forecast, ``--predict-only``) and print the comparison; the exit status."""
    from . import experiment

    config = _config(args)
    plan = experiment.sweep_plan(config)
    if args.predict_only:
        _print_ranking(experiment.rank_by_forecast(plan))
        return 0
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / config.name
    _fresh_output(out, args.force)
    result = experiment.sweep(
        plan, out, force=args.force, progress=not args.no_progress,
        on_point=lambda point: _print_sweep_point(plan.parameter, point),
    )
    _print_sweep(result)
    return 0


def _print_sweep_point(parameter: str, point: SweepPoint) -> None:
    """One swept value's line, printed as soon as its runs are done."""
    over = f" (mean of {len(point.runs)} seeds)" if len(point.runs) > 1 else ""
    print(f"  {parameter}={point.value}: relative kernel change {_format(point.means[RELATIVE_CHANGE])}, "
          f"linearisation gap {_format(point.means[TRAIN_GAP])}{over}")


def _print_sweep(result: SweepResult) -> None:
    """The sweep's table, its fitted slopes and where its figure is."""
    parameter = result.parameter
    rows = [("value", *SWEEP_LABELS.values())] + [
        (str(point.value), *(_format(point.means[field]) for field in SWEEP_LABELS)) for point in result.points
    ]
    print(f"\nSweep over {parameter}:")
    for row in rows:
        print("  " + "  ".join(f"{cell:>18}" for cell in row))
    for field, slope in result.slopes.items():
        print(f"  {SWEEP_LABELS[field]} ~ {parameter}^{slope:.2f}")
    if result.figure is not None:
        print(f"  figure: {result.figure}")


def _print_ranking(ranking: Ranking) -> None:
    """The swept values, best first, by what their forecasts predict."""
    metric = ranking.metric.replace("_", " ")
    over = f", mean of {ranking.seeds} seeds" if ranking.seeds > 1 else ""
    print(f"Ranking by {metric} after {ranking.steps} steps (no training{over}):")
    for place, ranked in enumerate(ranking.values, start=1):
        print(
            f"  {place}. {ranking.parameter}={ranked.value}: {metric} {_format(ranked.score)}, predicted train loss "
            f"{_format(ranked.predicted[records.predicted(records.TRAIN)])}, "
            f"max stable lr {_format(ranked.max_learning_rate)}"
        )


def cmd_predict(args: argparse.Namespace) -> int:
    """Print and draw the config's forecast before training; the exit status."""
    from . import experiment, plots

    config = _config(args)
    result = experiment.forecast(config)
    _print_forecast(config, result)
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / f"{config.name}-predict"
    out.mkdir(parents=True, exist_ok=True)
    figure = plots.forecast_figure(result.steps, result.rows, title=f"{config.name}: predicted before training")
    for fmt in ("png", "svg"):
        plots.save_figure(figure, out / f"predicted.{fmt}")
    print(f"  figure: {out / 'predicted.png'}")
    return 0


def _print_forecast(config: RunConfig, result: Forecast) -> None:
    """The predicted curve as a table, the stable learning rate and the kernel used."""
    columns = result.columns
    print(f"{config.name}: what the kernel at initialisation predicts (before any training)")
    print("  " + f"{'step':>8}" + "".join(f"{records.actual(split, metric):>16}" for split, metric in columns))
    for step, row in zip(result.steps, result.rows):
        cells = (_format(row.get(records.predicted(split, metric))) for split, metric in columns)
        print("  " + f"{step:>8}" + "".join(f"{cell:>16}" for cell in cells))
    lr, max_lr, description = config.train.lr, result.max_learning_rate, result.description
    if description.get("kind") == "twin":
        batches = "minibatches" if description.get("batches") == "minibatch" else "the full batch"
        print(f"  forecast: the linearised twin, trained alone with {description['optimizer']} on {batches} "
              f"(no real training), {description['points']} training points")
        return
    print(f"  largest stable learning rate: {_format(max_lr)} (config lr {lr})")
    if max_lr is not None and lr > max_lr:
        print(f"  warning: train.lr={lr} is above the stable limit; the linearised model diverges")
    print(f"  kernel: {description['kernel_mode']} ({description['approximation']}), "
          f"{description['points']} training points")


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "meta.json").is_file():
        raise UserError(f"{run_dir} is not an ntk_torch run directory (no meta.json)")
    return run_dir


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's figures; the exit status."""
    from . import plots

    run_dir = _run_dir(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "figures"
    paths = plots.save_all(run_dir, out, formats=args.formats.split(","))
    print(f"{len(paths)} figures written to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a run's HTML report and print its path; the exit status."""
    from . import report

    run_dir = _run_dir(args.run_dir)
    config_file = run_dir / "config.yaml"
    config = load_config(config_file) if config_file.is_file() else None
    print(report.write_report(run_dir, args.out, config=config))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Draw several runs in one figure; the exit status."""
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
    """Run the kernel benchmark of the source checkout, ``scripts/bench_ntk.py``, with the
    arguments after ``bench`` (its own parser reads them, ``--help`` included); the exit
    status."""
    if not (SCRIPTS_DIR / f"{BENCHMARK}.py").is_file():
        raise UserError(
            f"the benchmark ships with the source repository; run python scripts/{BENCHMARK}.py from a checkout"
        )
    if str(SCRIPTS_DIR) not in sys.path:
        sys.path.insert(0, str(SCRIPTS_DIR))
    return importlib.import_module(BENCHMARK).main(args.bench_argv, prog="ntk-torch bench")


# --------------------------------------------------------------------------- parser


def _add_config_options(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("config", help="a YAML config file (see configs/)")
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.05 (repeatable)")


def _add_training_options(parser: argparse.ArgumentParser, progress_help: str) -> None:
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help=progress_help)


def _add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="train a config with the tracker; write the run, figures and report",
                              description="Train the config's model with the NTK tracker attached; write the run "
                              "directory, figures and report.html, and print a summary.")
    _add_config_options(run, "output directory (default runs/<config name>)")
    _add_training_options(run, "no progress bar")
    run.set_defaults(handler=cmd_run)


def _add_sweep_parser(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser("sweep", help="run a config over its sweep values (e.g. widths)",
                                description="Run the config for each value of its sweep section (sweep.seeds "
                                "runs per value, averaged) and draw kernel drift and linearisation gap against the "
                                "swept value (log-log, fitted slopes).")
    _add_config_options(sweep, "output directory (default runs/<config name>)")
    _add_training_options(sweep, "no progress bars")
    sweep.add_argument("--predict-only", action="store_true",
                       help="no training: rank the sweep values by predicted test accuracy (or loss)")
    sweep.set_defaults(handler=cmd_sweep)


def _add_predict_parser(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="predict the training curve of the network linearised at step 0",
                                  description="Before any training: the linearised model's predicted train and test "
                                  "curves, from the kernel at initialisation (full-batch SGD: also the largest stable "
                                  "learning rate) or by training the linearised twin alone (other optimizers, "
                                  "schedulers, clipping, minibatches).")
    _add_config_options(predict, "where to write the figure (default runs/<config name>-predict)")
    predict.set_defaults(handler=cmd_predict)


def _add_run_dir_parsers(commands: argparse._SubParsersAction) -> None:
    """``plot``, ``report`` and ``compare``: the commands that read finished runs."""
    plot = commands.add_parser("plot", help="draw every figure of a run",
                               description="Draw every figure a run supports.")
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


def build_parser() -> argparse.ArgumentParser:
    """The ``ntk-torch`` parser; ``bench`` declares no options of its own (see :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        prog="ntk-torch",
        description="Training dynamics of PyTorch models through the empirical Neural Tangent Kernel.",
    )
    parser.add_argument("--version", action="version", version=f"ntk-torch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_parser(commands)
    _add_sweep_parser(commands)
    _add_predict_parser(commands)
    _add_run_dir_parsers(commands)
    commands.add_parser(
        "bench", help="time each kernel engine and mode (markdown table)", add_help=False
    ).set_defaults(handler=cmd_bench)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The parsed command line. What follows ``bench`` is left, unparsed, in
    ``bench_argv`` for the benchmark's own parser; any other command rejects arguments it
    does not know (exit status 2)."""
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_argv = unparsed
    elif unparsed:
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
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
