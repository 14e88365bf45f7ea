"""Small helpers shared by the test modules.

* :func:`is_tensor`, :func:`live_tensors`, :func:`live_tensor_count`: the tensors alive in
  the process, found without ``isinstance``. ``isinstance(obj, torch.Tensor)`` reads
  ``obj.__class__``, and on the deprecated ``torch.distributed.reduce_op`` proxy that
  emits a FutureWarning; ``type(obj)`` reads no attribute, so nothing is printed and no
  warning filter has to hide it.
* :func:`kernel_plan`: how ``NTK(model, **options)(x1, x2)`` would run (engine, block
  size), computing no kernel.
"""

from __future__ import annotations

import gc
from typing import Any, List

import torch

from ntk_torch import NTK
from ntk_torch.functional import evaluation_context
from ntk_torch.kernel.planning import KernelPlan, plan_kernel


def is_tensor(obj: Any) -> bool:
    """``isinstance(obj, torch.Tensor)`` without touching any attribute of ``obj``."""
    return issubclass(type(obj), torch.Tensor)


def live_tensors() -> List[torch.Tensor]:
    """Every tensor the garbage collector knows of, after a collection."""
    gc.collect()
    return [obj for obj in gc.get_objects() if is_tensor(obj)]


def live_tensor_count() -> int:
    """How many tensors are alive, after a collection."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if is_tensor(obj))


def kernel_plan(model: torch.nn.Module, x1: Any, x2: Any = None, **options: Any) -> KernelPlan:
    """The plan of ``NTK(model, **options)(x1, x2)``: its engine and block size."""
    kernel = NTK(model, **options)
    fmodel = kernel.view()
    with torch.no_grad(), evaluation_context(model, fmodel.device):
        return plan_kernel(kernel.options, kernel._memo, fmodel, x1, x2)
