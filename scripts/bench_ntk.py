#!/usr/bin/env python
"""Kernel benchmark; see ``ntk_torch/bench.py`` (same as ``ntk-torch bench``)."""

import sys

from ntk_torch.bench import main

if __name__ == "__main__":
    sys.exit(main())
