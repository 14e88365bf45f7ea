"""The ``ntk-torch`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__, bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-torch",
        description="Training dynamics of PyTorch models through the empirical Neural Tangent Kernel.",
    )
    parser.add_argument("--version", action="version", version=f"ntk-torch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench.build_parser(
        commands.add_parser(
            "bench",
            help="time each kernel engine and mode (markdown table)",
            description=bench.__doc__.split("\n")[0],
        )
    ).set_defaults(handler=bench.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
