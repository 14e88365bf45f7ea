"""The ``ntk-torch`` command: run, sweep, predict, kernel, plot, report, compare, bench.

Exit statuses: 0 on success; 2 for any error, printed as one line on stderr,
``ntk-torch: error: ...``, without a traceback (``--debug`` prints the traceback first;
usage errors exit 2 too, argparse's convention); 130 on Ctrl-C (SIGINT) and 143 on
SIGTERM, which stop training like Ctrl-C and leave a loadable run with status
``interrupted``. Warnings are printed as one line each, ``ntk-torch: warning: ...``.

The package is imported inside :func:`main`, so Ctrl-C while torch is still loading is
an interruption like any other (no traceback), and so that the command can ask torch's
allocator for huge pages before torch starts (:func:`ntk_torch.allocator.prefer_huge_pages`;
``THP_MEM_ALLOC_ENABLE=0`` keeps torch's default); ``NTK_TORCH_KEEP_FREED_MEMORY=1`` has
glibc keep freed memory too (:func:`ntk_torch.allocator.keep_for_command`).

A config can run code (import paths in ``data.name``/``model.name``); only modules named by
``--allow-import`` or ``NTK_TORCH_ALLOW_IMPORT`` are imported, and each import path is
printed before running.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import allocator, records
from ._version import __version__

if TYPE_CHECKING:  # the commands import config, experiment and all they load only when they run
    from .config import RunConfig
    from .experiment import Forecast
    from .sweeps import Ranking, SweepPoint, SweepResult
    from .runs import Run

DEFAULT_RUNS_DIR = Path("runs")
RELATIVE_CHANGE, TRAIN_GAP = records.RELATIVE_CHANGE, records.gap(records.TRAIN)
SWEEP_LABELS = {RELATIVE_CHANGE: "relative change", TRAIN_GAP: "linearisation gap",
                records.ANALYTIC_DISTANCE: "distance from infinite width (step 0)"}
"""The columns of the sweep table: record field -> heading (the last with ``track.analytic_reference``)."""
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
"""The repository's scripts/ beside the package: present in a checkout (an editable or
source install), absent from a wheel."""
BENCHMARK = "bench_ntk"
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143
"""Exit statuses: an error; Ctrl-C (128 + SIGINT); SIGTERM (128 + SIGTERM)."""
MAX_MESSAGE = 2000
"""The longest error or warning line printed (characters)."""


class UserError(Exception):
    """An error in what the user asked for: reported in one line, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that training stops as on Ctrl-C."""


# --------------------------------------------------------------------------- helpers


def _note(message: str) -> None:
    from .progress import write  # a line of its own, never inside a phase line or a bar

    write(f"ntk-torch: {message}")


def _phase(args: argparse.Namespace, label: str) -> Any:
    """A :func:`ntk_torch.progress.phase` line on stderr, unless ``--no-progress``."""
    from .progress import phase

    return phase(label, enabled=not getattr(args, "no_progress", False))


def _config(args: argparse.Namespace) -> RunConfig:
    """The config, validated, after checking (and printing) the code it will import."""
    from .config import check_imports, load_config, trusted_modules

    config = load_config(args.config, args.set or ())
    for key, path in check_imports(config, trusted_modules(args.allow_import or ()), source=args.config):
        _note(f"{key} {path!r}: the config runs code from this trusted module")
    return config


def _fresh_output(path: Path, force: bool) -> bool:
    """Refuse to write into an existing non-empty directory unless ``force``; whether what
    is there may be replaced (``force``, or a run that failed before recording anything)."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    if not (path.is_dir() and any(path.iterdir())):
        return force
    if force:
        return True
    failure = _failed_without_records(path)
    if failure is not None:
        _note(f"replacing {path}: it holds a run that failed before recording anything ({failure})")
        return True
    raise UserError(f"{path} already exists; pass --force to replace it or --out to choose another directory")


def _failed_without_records(path: Path) -> Optional[str]:
    """The reason of the run in ``path`` if it failed with no record, else None."""
    from .runs import load_run

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = load_run(path)
    except (OSError, ValueError):
        return None
    return (run.reason or "failed") if run.status == "failed" and not len(run) else None


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


def _finish_run(run_dir: Path, config: RunConfig, args: argparse.Namespace) -> List[Path]:
    """Figures and the HTML report of a finished run (with the config saved beside it, the
    one that ran); prints the summary table."""
    from . import plots, report
    from .config import ConfigError, load_config
    from .runs import load_run

    run = load_run(run_dir)
    with contextlib.suppress(ConfigError):
        config = load_config(run.path / "config.yaml")
    with _phase(args, "figures") as drawing:
        figures = plots.save_all(run, run_dir / "figures")
        drawing.detail = f"{len({path.stem for path in figures})} figures"
    with _phase(args, "report"):  # embeds the PNGs just written instead of drawing them again
        pngs = {path.stem: path.read_bytes() for path in figures if path.suffix == ".png"}
        page = report.write_report(run, run_dir / "report.html", config=config, images=pngs)
    _print_table(report.summary_table(run), title=f"\n{config.name}: {run_dir}")
    print(f"  figures in {run_dir / 'figures'}, report {page}")
    return figures + [page]


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    """Train the config and write its figures and report; the exit status (130 on Ctrl-C,
    143 on SIGTERM)."""
    with _phase(args, "loading torch and the config"):
        from . import experiment, results

        config = _config(args)
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / config.name
    replace = _fresh_output(out, args.force)
    try:
        experiment.run(config, out, force=replace, progress=not args.no_progress, allow_imports=args.allow_import or (),
                       tensorboard=args.tensorboard)
    except KeyboardInterrupt as interruption:
        print(f"\nntk-torch: {_interrupted(interruption)}; the run recorded so far is in {out}", file=sys.stderr)
        return _interrupt_status(interruption)
    args.summary = results.run_result(out, _finish_run(out, config, args))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train the sweep (or rank it by forecast, ``--predict-only``) and print the comparison; the exit status."""
    with _phase(args, "loading torch and the config"):
        from . import results, sweeps

        config = _config(args)
    plan = sweeps.sweep_plan(config)
    trusted = args.allow_import or ()
    if args.predict_only:
        ranking = sweeps.rank_by_forecast(plan, allow_imports=trusted)
        _print_ranking(ranking)
        args.summary = results.ranking_result(ranking)
        return 0
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / config.name
    _fresh_output(out, args.force)
    result = sweeps.sweep(
        plan, out, force=args.force, progress=not args.no_progress,
        on_point=lambda point: _print_sweep_point(plan.parameter, point), allow_imports=trusted,
    )
    _print_sweep(result)
    args.summary = results.sweep_result(result)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """Rank a selection config's candidates before training (``--validate``: then train some); the exit status."""
    from . import selection

    k = args.validate if args.validate in (None, "all") else _positive_int("--validate", args.validate)
    space = selection.load_space(args.config)
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / space.name
    chosen = selection.rank(space, progress=not args.no_progress)
    if k is not None:
        selection.validate(chosen, space, k, baselines=not args.no_baselines, progress=not args.no_progress)
    paths = selection.write(chosen, out)
    print(selection.table(chosen))
    for line in selection.summary_lines(chosen):
        print(line)
    print(f"wrote {paths['json']}, {paths['figure']} and {paths['html']}")
    return 0


def _positive_int(flag: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{flag} must be a positive integer or 'all', got {text!r}")
    return int(text)


def _print_sweep_point(parameter: str, point: SweepPoint) -> None:
    """One swept value's line, printed as soon as its runs are done (mean ± the standard
    deviation across seeds, and their range)."""
    from .results import point_spreads

    spread = point_spreads(point)
    print(f"  {parameter}={point.value}: " + ", ".join(f"{SWEEP_LABELS[field]} {_spread(spread[field])}"
                                                     for field in SWEEP_LABELS if field in spread))


def _spread(spread: Dict[str, Any]) -> str:
    if spread["std"] is None:
        return _format(spread["mean"])
    return (f"{_format(spread['mean'])} ± {_format(spread['std'])} "
            f"(min {_format(spread['min'])}, max {_format(spread['max'])}, {len(spread['seeds'])} seeds)")


def _mean_and_std(spread: Dict[str, Any]) -> str:
    """A table cell: the seeds' mean, ``± std`` when there are several."""
    mean = _format(spread["mean"])
    return mean if spread["std"] is None else f"{mean} ± {_format(spread['std'])}"


def _print_sweep(result: SweepResult) -> None:
    """The sweep's table, its fitted slopes and where its figure is."""
    from .results import MIN_SLOPE_POINTS, point_spreads, slope_points

    parameter = result.parameter
    fields = [field for field in SWEEP_LABELS if field in result.points[0].means]
    rows = [("value", *(SWEEP_LABELS[field] for field in fields))] + [
        (str(point.value), *(_mean_and_std(spreads[field]) for field in fields))
        for point, spreads in ((point, point_spreads(point)) for point in result.points)
    ]
    seeds = len(result.points[0].runs)
    print(f"\nSweep over {parameter}" + (f" (mean ± standard deviation over {seeds} seeds):" if seeds > 1 else ":"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(f"{cell:>{width}}" for cell, width in zip(row, widths)))

    for field, slope in result.slopes.items():
        count = slope_points(result, field)
        caveat = (f" (caveat: fitted through only {count} points, which always lie on a line; use at least "
                  f"{MIN_SLOPE_POINTS} values to test a power law)") if count < MIN_SLOPE_POINTS else ""
        print(f"  {SWEEP_LABELS[field]} ~ {parameter}^{slope:.2f}{caveat}")
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
    with _phase(args, "loading torch and the config"):
        from . import experiment, plots, results

        config = _config(args)
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / f"{config.name}-predict"
    _fresh_output(out, args.force)
    with _phase(args, "forecast before training"):
        result = experiment.forecast(config, allow_imports=args.allow_import or ())
    _print_forecast(config, result)
    out.mkdir(parents=True, exist_ok=True)
    figure = plots.forecast_figure(result.steps, result.rows, title=f"{config.name}: predicted before training")
    for fmt in ("png", "svg"):
        plots.save_figure(figure, out / f"predicted.{fmt}")
    print(f"  figure: {out / 'predicted.png'}")
    args.summary = results.forecast_result(config.name, result, out / "predicted.png")
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


def cmd_kernel(args: argparse.Namespace) -> int:
    """Write the kernel of the config's model on a data split to a .npy file; the exit status."""
    from . import kernel_files
    from .errors import DistributedKernelError, KernelStoreError

    config = _config(args)
    if Path(args.out).suffix != ".npy":
        raise UserError(f"--out {args.out}: the kernel is written as a .npy file; give a name ending in .npy")
    try:
        written = kernel_files.kernel_file(
            config, args.out, split=args.split, mode=args.mode, weights=args.weights, resume=args.resume,
            memory_budget=args.memory_budget, progress=not args.no_progress,
            allow_imports=args.allow_import or (),
        )
    except (kernel_files.CheckpointError, KernelStoreError, DistributedKernelError) as error:
        raise UserError(str(error)) from None
    except FileExistsError:
        raise UserError(f"--out {args.out} (or its .partial/.progress.json files) already exists; pass --resume to "
                        "continue or reuse it, or delete them to start again") from None
    if written.main:
        at = f"weights {written.weights}" if written.weights is not None else "initialisation"
        over = f" over {written.ranks} processes" if written.ranks > 1 else ""
        print(f"{config.name}: {written.mode} kernel {written.shape} on the {written.split} split at {at}, "
              f"written to {written.path} in {written.seconds:.1f} s{over}")
    return 0


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "meta.json").is_file():
        raise UserError(f"{run_dir} is not an ntk_torch run directory (no meta.json)")
    return run_dir


def _load(path: str) -> Run:
    """The run in ``path``; what it skipped is printed as a warning (``Run.problems``)."""
    from .runs import load_run

    return load_run(_run_dir(path))


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's figures; the exit status."""
    from . import plots

    formats = [fmt.strip() for fmt in args.formats.split(",")]
    run = _load(args.run_dir)
    out = Path(args.out) if args.out else run.path / "figures"
    try:
        paths = plots.save_all(run, out, formats=formats)
    except ValueError as error:
        if "formats" in str(error):
            raise UserError(f"--formats {args.formats!r}: {error}") from None
        raise
    print(f"{len(paths)} figures written to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a run's HTML report and print its path; the exit status."""
    from . import report
    from .config import ConfigError, load_config

    run = _load(args.run_dir)
    config_file = run.path / "config.yaml"
    config = None
    if config_file.is_file():
        try:
            config = load_config(config_file)
        except ConfigError as error:
            warnings.warn(f"the report is written without the run's config: {error}", RuntimeWarning)
    print(report.write_report(run, args.out, config=config))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Draw several runs in one figure (those that can be read); the exit status."""
    from . import plots

    if args.labels and len(args.labels) != len(args.run_dirs):
        raise UserError(f"--labels gives {len(args.labels)} labels for {len(args.run_dirs)} runs")
    out = Path(args.out) if args.out else DEFAULT_RUNS_DIR / "compare"
    _fresh_output(out, args.force)
    runs, labels = [], []
    for index, path in enumerate(args.run_dirs):
        try:
            runs.append(_load(path))
        except (UserError, OSError, ValueError) as error:
            warnings.warn(f"compare skips {path}: {error}", RuntimeWarning)
            continue
        labels.append(args.labels[index] if args.labels else None)
    if not runs:
        raise UserError("none of the runs given to compare could be read")
    out.mkdir(parents=True, exist_ok=True)
    figure = plots.compare(runs, labels=labels if args.labels else None)
    paths = [plots.save_figure(figure, out / f"compare.{fmt}") for fmt in ("png", "svg")]
    print(f"comparison of {len(runs)} runs: {paths[0]}")
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

DEBUG_HELP = "on an error, print the Python traceback before the one-line message"


def _add_config_options(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("config", help="a YAML config file (see configs/)")
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.05 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON alone on stdout (the run's "
                        "summary.json, the sweep's points and slopes, the forecast); everything else goes to stderr")
    _add_allow_import(parser)


def _add_allow_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-import", action="append", metavar="MODULE",
                        help="trust MODULE (and its submodules) for import paths 'package.module:function' in "
                        "data.name/model.name: a config can run code, and only trusted modules are imported "
                        "(repeatable; also NTK_TORCH_ALLOW_IMPORT=mod1,mod2)")


def _add_training_options(parser: argparse.ArgumentParser, progress_help: str) -> None:
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help=progress_help)


def _add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="train a config with the tracker; write the run, figures and report",
                              description="Train the config's model with the NTK tracker attached; write the run "
                              "directory, figures and report.html, and print a summary.")
    _add_config_options(run, "output directory (default runs/<config name>)")
    _add_training_options(run, "no progress bar")
    run.add_argument("--tensorboard", metavar="DIR", help="also log the measurements (scalars ntk/...) and the "
                     "figures to TensorBoard in DIR (pip install 'ntk-torch[tensorboard]')")
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


def _add_select_parser(commands: argparse._SubParsersAction) -> None:
    select = commands.add_parser("select", help="rank candidate networks and learning rates before training",
                                 description="Rank a selection config's candidates by the kernel forecast at "
                                 "initialisation; write selection.json, selection.png and selection.html.")
    select.add_argument("config", help="selection config (YAML: base, candidates, learning_rates)")
    select.add_argument("--out", help="output directory (default runs/<selection name>)")
    select.add_argument("--validate", metavar="K", help="train the top K and K random candidates (or 'all')")
    select.add_argument("--no-baselines", action="store_true", help="with --validate: skip the one-epoch baseline")
    select.add_argument("--no-progress", action="store_true", help="no progress lines")
    select.set_defaults(handler=cmd_select)


def _add_predict_parser(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="predict the training curve of the network linearised at step 0",
                                  description="Before any training: the linearised model's predicted train and test "
                                  "curves, from the kernel at initialisation (full-batch SGD: also the largest stable "
                                  "learning rate) or by training the linearised twin alone (other optimizers, "
                                  "schedulers, clipping, minibatches).")
    _add_config_options(predict, "where to write the figure (default runs/<config name>-predict)")
    predict.add_argument("--force", action="store_true", help="replace the figure in an existing output directory")
    predict.add_argument("--no-progress", action="store_true", help="no progress lines")
    predict.set_defaults(handler=cmd_predict)


def _add_kernel_parser(commands: argparse._SubParsersAction) -> None:
    kernel = commands.add_parser(
        "kernel", help="write the kernel of a config's model on its data to a .npy file",
        description="The empirical NTK of the config's model (at initialisation, or at --weights) on every example "
        "of a data split, written tile by tile to a .npy file that need not fit in memory. Under torchrun "
        "--nproc_per_node=K the K processes share the tiles.")
    kernel.add_argument("config", help="a YAML config file (see configs/)")
    kernel.add_argument("--out", required=True, help="the .npy file to write")
    kernel.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.options.width=512 (repeatable)")
    _add_allow_import(kernel)
    kernel.add_argument("--resume", action="store_true", help="continue an interrupted computation of --out")
    kernel.add_argument("--weights", help="a state dict saved with torch.save (default: the model at initialisation)")
    kernel.add_argument("--split", choices=("train", "test"), default="train",
                        help="the data split whose examples the kernel is over (default train: the whole training set)")
    kernel.add_argument("--mode", help="the kernel's layout, one of the values of track.mode (default the "
                        "config's track.mode)")
    kernel.add_argument("--memory-budget", help="peak extra memory per tile, e.g. 2GB (default a quarter of free RAM)")
    kernel.add_argument("--no-progress", action="store_true", help="no progress bar")
    kernel.set_defaults(handler=cmd_kernel)


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
    compare.add_argument("--out", help="output directory (default runs/compare)")
    compare.add_argument("--labels", nargs="+", help="one legend label per run")
    compare.add_argument("--force", action="store_true", help="replace the figure in an existing output directory")
    compare.set_defaults(handler=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    """The ``ntk-torch`` parser; ``bench`` declares no options of its own (see :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        prog="ntk-torch",
        description="Training dynamics of PyTorch models through the empirical Neural Tangent Kernel.",
    )
    parser.add_argument("--version", action="version", version=f"ntk-torch {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_parser(commands)
    _add_sweep_parser(commands)
    _add_select_parser(commands)
    _add_predict_parser(commands)
    _add_kernel_parser(commands)
    _add_run_dir_parsers(commands)
    commands.add_parser(
        "bench", help="time each kernel engine and mode (markdown table)", add_help=False
    ).set_defaults(handler=cmd_bench)
    for name, command in commands.choices.items():
        if name != "bench":  # bench passes its arguments on: ntk-torch --debug bench
            command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
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
    """Run the command line ``argv``; the exit status (see the module docstring). Usage
    errors and ``--help`` raise ``SystemExit`` as argparse does."""
    allocator.prefer_huge_pages()
    args = parse_args(argv)
    with _one_line_warnings(), _sigterm_as_interrupt():
        try:
            allocator.keep_for_command()
            return _handle(args)
        except KeyboardInterrupt as interruption:  # runs already written stay loadable
            print(f"\nntk-torch: {_interrupted(interruption)}", file=sys.stderr)
            return _interrupt_status(interruption)
        except Exception as error:
            if args.debug:
                traceback.print_exc()
            print(f"ntk-torch: error: {_describe(error, args.debug)}", file=sys.stderr)
            return EXIT_ERROR


def _handle(args: argparse.Namespace) -> int:
    """The command's exit status; with ``--json``, what it prints goes to stderr and its
    result (``args.summary``, see :mod:`ntk_torch.results`) alone to stdout."""
    if not getattr(args, "json", False):
        return int(args.handler(args) or 0)
    from .results import dumps

    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        status = int(args.handler(args) or 0)
    stdout.write(dumps(getattr(args, "summary", None)) + "\n")
    return status


_EXPECTED = (UserError, OSError, ValueError, TypeError, ImportError, LookupError, FloatingPointError)
"""Errors whose message is the whole story (bad input, files); others are shown with their type."""


def _describe(error: BaseException, debug: bool) -> str:
    """``error`` as one line: its message (with its type unless it is an expected one), and
    the ``--debug`` hint for an unexpected one."""
    text = _one_line(str(error)) or type(error).__name__
    if isinstance(error, _EXPECTED):
        return text
    hint = "" if debug else " (run with --debug for the traceback)"
    return f"{type(error).__name__}: {text}{hint}"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _interrupted(interruption: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(interruption, Terminated) else "interrupted"


def _interrupt_status(interruption: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(interruption, Terminated) else EXIT_INTERRUPTED


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    from .progress import write  # above a progress bar, never inside a phase line

    write(f"ntk-torch: warning: {_one_line(str(message))}")


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings printed as ``ntk-torch: warning: ...``, one line each, inside the block."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        yield


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block (main thread only), SIGTERM raises :class:`Terminated`, a
    ``KeyboardInterrupt``: training stops and the run closes as ``interrupted``."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
