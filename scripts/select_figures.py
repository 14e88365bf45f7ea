"""The README's selection figures: ``ntk-torch select --validate all`` on the shipped spaces.

    python scripts/select_figures.py                 # both spaces, every candidate trained
    python scripts/select_figures.py --quick         # the first 4 candidates of each space
    taskset -c 0 python scripts/select_figures.py --threads 1

Prints one markdown table (machine, torch version, threads, load average, then per space
and ranking method: Kendall tau-b, Spearman rho, the pick's trained accuracy, regret) and
the compute (seconds of the selection against training every candidate).
"""

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ntk_torch import selection  # noqa: E402

SPACES = ("configs/select_digits.yaml", "configs/select_speech.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first 4 candidates of each space only")
    parser.add_argument("--points", type=int, default=None, help="override forecast.points and test_points")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all)")
    parser.add_argument("--out", default="runs/select_figures", help="where the selections are written")
    parser.add_argument("spaces", nargs="*", default=SPACES)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"
          f"{' (quick)' if args.quick else ''}\n")
    print("| space | candidates | method | Kendall tau | Spearman rho | pick trained acc | best trained acc | regret |")
    print("|---|---|---|---|---|---|---|---|")
    compute = []
    for path in args.spaces:
        raw = yaml.safe_load((ROOT / path).read_text())
        if args.quick:
            raw["candidates"] = raw["candidates"][:4]
        if args.points:
            raw["forecast"] = {**raw.get("forecast", {}), "points": args.points, "test_points": args.points}
        result = selection.select(raw, Path(args.out) / raw["name"], validate_k="all")
        summary = result.summary
        for method, r in summary["ranking"].items():
            print(f"| {raw['name']} | {len(result.entries)} | {method} | {r['kendall_tau']:.3f} | "
                  f"{r['spearman_rho']:.3f} | {r['pick_accuracy']:.4f} | {summary['best_trained_accuracy']:.4f} | "
                  f"{r['regret']:.4f} |")
        c = summary["compute"]
        compute.append(f"| {raw['name']} | {c['selection_seconds']:.1f} | {c['train_everything_seconds']:.1f} | "
                       f"{c['one_epoch_seconds']:.1f} | {c['saving']:.2f}x |")
    print("\n| space | selection s | train everything s | one-epoch baseline s | saving |\n|---|---|---|---|---|")
    print("\n".join(compute))


if __name__ == "__main__":
    main()
