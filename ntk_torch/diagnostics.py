"""What the forecast does not model, noticed during training: warnings that explain a gap.

:class:`GapWatch` watches a training run for what makes the network and its forecast
differ for reasons other than leaving the kernel regime, and warns about each once, as a
:class:`ntk_torch.errors.ForecastWarning` pointing at the user's own line:

* **BatchNorm in train mode** during training: the network normalises each batch by its
  own statistics; the kernels and the forecast use the network in eval mode (running
  statistics, at step 0 the defaults).
* **Dropout active** during training (``nn.Dropout`` and its kin, attention dropout): the
  kernels and the forecast are of the network without it.
* **A learning rate above the stable one** of the linearised model (the kernel forecast's
  ``predict.max_learning_rate``), by what factor.
* **Minibatches forecast as full batch**: the kernel forecast, or a twin trained on the
  full batch, while each step uses fewer examples than the training set. Detected from
  ``NTKTracker.observe`` when the user calls it, else from the batch size of the model's
  forward passes in training mode with gradients on (a forward pre-hook that reads the
  inputs' first dimension, nothing else); forward passes that together cover the training
  set between two steps (gradient accumulation over all of it) count as full batch.
* **Gradient clipping the tracker was not told about**: an optimizer step pre-hook reads
  (never writes) the gradients' global 2-norm and largest magnitude into a ring of the
  last :data:`WINDOW` steps, on the gradients' device (no synchronisation); every
  ``WINDOW`` steps the ring is read, and a maximum reached on :data:`REPEATS` or more
  steps to within rounding — what ``clip_grad_norm_`` / ``clip_grad_value_`` leave behind,
  and ordinary training practically never does — is reported with the threshold. It
  cannot see clipping that never binds, nor clipping applied per parameter group.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .errors import ForecastWarning, user_stacklevel

__all__ = ["GapWatch", "REPEATS", "WINDOW"]

WINDOW = 16
"""Optimizer steps in the ring of gradient statistics that clipping is detected from."""
REPEATS = 3
"""Steps of a window whose gradient statistic must equal the window's maximum."""
NORM_TOLERANCE = 1e-5
"""Relative tolerance of "equal" for clipped global norms (``clip_grad_norm_`` divides by
``norm + 1e-6``, and the norm itself is rounded)."""
VALUE_TOLERANCE = 1e-6
"""Relative tolerance for clipped gradient entries (``clamp`` returns the bound itself)."""


def _first_batch_size(value: Any) -> Optional[int]:
    """The first dimension of the first tensor (of at least one dimension) in ``value``."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        size = _first_batch_size(item)
        if size is not None:
            return size
    return None


def _norms(tensors: List[torch.Tensor], order: float) -> torch.Tensor:
    """The ``order``-norm of each tensor, float64 ``(len(tensors),)`` on the first one's
    device (``torch._foreach_norm`` where it takes them, one norm at a time otherwise)."""
    try:
        return torch.stack(torch._foreach_norm(tensors, order)).double()
    except (RuntimeError, TypeError, AttributeError):  # mixed devices or dtypes, or no foreach
        device = tensors[0].device
        return torch.stack([torch.linalg.vector_norm(t, order).to(device, torch.float64) for t in tensors])


def _names(model: nn.Module, modules: List[nn.Module], limit: int = 3) -> str:
    paths = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
    shown = [repr(paths[id(m)]) for m in modules[:limit]]
    more = f" and {len(modules) - limit} more" if len(modules) > limit else ""
    return ", ".join(shown) + more


def _repeated_maximum(values: torch.Tensor, tolerance: float) -> Optional[float]:
    """The window's maximum if at least :data:`REPEATS` values equal it to within
    ``tolerance`` (relative), else None; zero gradients never count."""
    top = float(values.max())
    if not top > 0:
        return None
    close = int((values >= top * (1 - tolerance)).sum())
    return top if close >= REPEATS else None


class GapWatch:
    """Watches one training run for what the forecast does not model (module docstring).

    Args:
        model: the module being trained (unwrapped).
        train_size: the number of training examples (a step on fewer is a minibatch).
        kind: the forecast, ``"kernel"`` or ``"twin"``.
        full_batch: whether the forecast trains on the full batch.
        max_learning_rate: the linearised model's largest stable learning rate, when known.
        clipping_known: the tracker was told how the user clips (no detection needed).

    :meth:`attach` hooks the model's forward and the optimizer's step; :meth:`after_step`
    checks after each optimizer step; :meth:`remove` takes the hooks off.
    """

    def __init__(self, model: nn.Module, train_size: int, *, kind: str, full_batch: bool,
                 max_learning_rate: Optional[float], clipping_known: bool) -> None:
        self.model, self.train_size = model, train_size
        self.kind, self.full_batch, self.max_learning_rate = kind, full_batch, max_learning_rate
        self.clipping_known = clipping_known
        self._batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self._dropouts = [
            m for m in model.modules()
            if (isinstance(m, _DropoutNd) and m.p > 0) or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
        ]
        self.warned: Dict[str, bool] = {}
        self._observed = self._forwarded = 0
        self._hooks: List[Any] = []
        self._ring: Optional[torch.Tensor] = None  # (2, WINDOW): global norms, largest magnitudes
        self._steps = 0

    # ------------------------------------------------------------------ hooks

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook the model's forward (batch sizes) and, unless clipping is known, the
        optimizer's step (gradient statistics)."""
        self.remove()
        self._hooks.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        if not self.clipping_known:
            self._hooks.append(optimizer.register_step_pre_hook(self._on_step))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def observed(self, size: int) -> None:
        """``NTKTracker.observe`` was shown a batch of ``size`` examples for this step."""
        self._observed += size

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if module.training and torch.is_grad_enabled():
            size = _first_batch_size((args, kwargs))
            self._forwarded += size or 0

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Record the gradients' global norm and largest magnitude (read only)."""
        if getattr(optimizer, "grad_scale", None) is not None:  # fused AMP: gradients still scaled
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or grads[0].is_sparse:
            return
        with torch.no_grad():
            norms, largest = _norms(grads, 2.0), _norms(grads, math.inf)
            if self._ring is None or self._ring.device != norms.device:
                self._ring = torch.zeros(2, WINDOW, dtype=torch.float64, device=norms.device)
            self._ring[:, self._steps % WINDOW] = torch.stack([torch.linalg.vector_norm(norms), largest.max()])
        self._steps += 1

    # ------------------------------------------------------------------ checks

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """The checks after optimizer step ``step``; each warns at most once."""
        if not self.warned.get("batchnorm"):
            training = [m for m in self._batchnorms if m.training]
            if training:
                self._warn("batchnorm", (
                    f"BatchNorm is in train mode during training ({_names(self.model, training)}): the network "
                    "normalises each batch by its own statistics, while the kernels and the forecast use the "
                    "network in eval mode, on the running statistics (at step 0 their initial values: mean 0, "
                    "variance 1). Part of any gap between the predicted and the actual curve is this "
                    "difference, not the network leaving the kernel regime."))
        if not self.warned.get("dropout"):
            active = [m for m in self._dropouts if m.training]
            if active:
                self._warn("dropout", (
                    f"Dropout is active during training ({_names(self.model, active)}): the kernels and the "
                    "forecast are of the network without Dropout, so part of any gap between the predicted and "
                    "the actual curve is Dropout's noise, not the network leaving the kernel regime."))
        self._check_learning_rate(optimizer)
        self._check_batches()
        if self._ring is not None and self._steps % WINDOW == 0 and not self.warned.get("clipping"):
            self._check_clipping()

    def _check_learning_rate(self, optimizer: torch.optim.Optimizer) -> None:
        limit = self.max_learning_rate
        if self.warned.get("lr") or limit is None or not limit > 0:
            return
        lr = max(float(group["lr"]) for group in optimizer.param_groups)
        if lr > limit:
            self._warn("lr", (
                f"the learning rate {lr:g} is {lr / limit:.3g}x the largest stable learning rate of the "
                f"linearised model, {limit:.4g} (predict.max_learning_rate of the kernel at step 0 for this "
                "loss and momentum): the forecast diverges, and training at this rate likely does too. For "
                "cross_entropy the bound is a sufficient one, sharp only where the softmax splits between two "
                f"classes; lower the learning rate below {limit:.4g} for a stable forecast."))

    def _check_batches(self) -> None:
        seen = self._observed or self._forwarded
        source = "observed" if self._observed else "seen in the model's forward passes"
        self._observed = self._forwarded = 0
        if self.warned.get("minibatch") or not self.full_batch or not 0 < seen < self.train_size:
            return
        forecast = ("the kernel forecast is full-batch SGD, which minibatch training follows only on average"
                    if self.kind == "kernel" else
                    "the twin trains on the full batch, since no batch was observed before the first step")
        self._warn("minibatch", (
            f"minibatches forecast as full batch: the last step used {seen} of the {self.train_size} training "
            f"examples ({source}), but {forecast}. Show the tracker each batch — tracker.observe(x, y) "
            "before optimizer.step(), or `for x, y in tracker.batches(loader)` — from the first step, with "
            "forecast='auto' or 'twin', to forecast on the same minibatches."))

    def _check_clipping(self) -> None:
        ring = self._ring.cpu()
        for row, tolerance, option, what in ((0, NORM_TOLERANCE, "clip_grad_norm", "global gradient norm"),
                                              (1, VALUE_TOLERANCE, "clip_grad_value", "largest gradient entry")):
            value = _repeated_maximum(ring[row], tolerance)
            if value is None:
                continue
            remedy = ("the twin then clips as you do; the kernel forecast cannot clip, so use forecast='auto' or "
                      "'twin'" if self.kind == "kernel" else "the twin then clips as you do")
            self._warn("clipping", (
                f"the gradients look clipped: the {what} was {value:.4g} on {REPEATS} or more of the last "
                f"{WINDOW} steps, its maximum there, but the forecast does not clip. Pass "
                f"{option}={value:.4g} to NTKTracker ({remedy})."))
            return

    def _warn(self, key: str, message: str) -> None:
        self.warned[key] = True
        warnings.warn(f"NTKTracker: {message}", ForecastWarning, stacklevel=user_stacklevel())
