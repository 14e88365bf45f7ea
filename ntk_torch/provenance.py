"""What a tracked run's ``meta.json`` says about it: the model, the probe, the
configuration and the versions that made it (JSON-friendly, for ``RunWriter``)."""

from __future__ import annotations

import platform
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .probe import LabelledSet

__all__ = ["describe", "run_metadata", "versions"]


def versions() -> Dict[str, str]:
    """The versions of ntk_torch, torch, numpy and Python."""
    return {
        "ntk_torch": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def describe(value: Any) -> Any:
    """A JSON-friendly description of a configuration value (callables by name)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, nn.Module):
        return type(value).__name__
    return getattr(value, "__qualname__", type(value).__name__)


def run_metadata(
    model: nn.Module,
    *,
    tracked: Iterable[torch.Tensor],
    device: torch.device,
    probe: LabelledSet,
    test: Optional[LabelledSet],
    train_size: int,
    labels: Optional[List[int]],
    config: Mapping[str, Any],
) -> Dict[str, Any]:
    """The ``meta`` of a tracked run: ``model`` (class, summary, parameter counts, device),
    ``probe`` (size, indices into the training data, its class ``labels`` for figures
    sorted by class), ``test`` (size), ``config`` (the tracker's options), ``versions``
    and the creation time."""
    all_params = list(model.parameters())
    return {
        "model": {
            "class": type(model).__name__,
            "summary": str(model),
            "num_params": sum(p.numel() for p in all_params),
            "num_trainable": sum(p.numel() for p in all_params if p.requires_grad),
            "num_tracked": sum(p.numel() for p in tracked),
            "device": str(device),
        },
        "probe": {
            "size": len(probe),
            "indices": list(probe.indices),
            "train_size": train_size,
            "labels": labels,
        },
        "test": {"size": len(test)} if test is not None else None,
        "config": dict(config),
        "versions": versions(),
        "created": time.time(),
    }
