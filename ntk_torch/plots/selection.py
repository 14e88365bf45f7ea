"""The figure of a selection (``ntk-torch select``): drawn from its ``selection.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Union

from matplotlib.axes import Axes

from ._axes import new_axes

__all__ = ["selection_figure"]


def _read(source: Union[str, Path]) -> Dict[str, Any]:
    path = Path(source)
    path = path / "selection.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"selection_figure: cannot read a selection.json at {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"selection_figure: {path} is not a selection.json (no 'entries' list)")
    return data


def selection_figure(source: Union[str, Path], ax: Optional[Axes] = None) -> Axes:
    """Predicted against trained, from the ``selection.json`` at ``source`` (the file or
    its directory): for the trained candidates, the predicted score (x) against the
    trained test accuracy (y), rates flagged unstable at initialisation in red; before any
    training, the forecast test accuracy of every candidate by rank. Returns the Axes.

    Raises:
        ValueError: ``source`` holds no readable selection.json.
    """
    data = _read(source)
    ax = new_axes(ax)
    entries = data["entries"]
    name = data.get("name", "selection")
    trained = [e for e in entries if (e.get("trained") or {}).get("test_accuracy") is not None]
    if trained:
        for stable, colour, label in ((True, "C0", "stable at initialisation"), (False, "C3", "flagged unstable")):
            group = [e for e in trained if bool(e["signals"].get("stable")) == stable]
            if group:
                ax.scatter([e["score"] for e in group], [e["trained"]["test_accuracy"] for e in group],
                           color=colour, label=label)
        ax.legend(loc="best")
        ax.set_xlabel("predicted score")
        ax.set_ylabel("trained test accuracy")
        tau = ((data.get("summary") or {}).get("ranking") or {}).get("predicted", {}).get("kendall_tau")
        tau_text = "n/a" if tau is None or not math.isfinite(tau) else f"{tau:.2f}"
        ax.set_title(f"{name}: predicted against trained (Kendall tau {tau_text})")
    else:
        accuracy = [e["signals"].get("predicted_test_accuracy") for e in entries]
        ax.bar([e["rank"] for e in entries], [0.0 if a is None else a for a in accuracy])
        ax.set_xlabel("rank")
        ax.set_ylabel("forecast test accuracy")
        ax.set_title(f"{name}: candidates by predicted score")
    return ax
