"""What identifies one kernel request: hashes of the weights and inputs, and its description.

A kernel written to disk tile by tile (:mod:`.store`) may only be continued by the same
request, and the ranks of a distributed computation (:mod:`.distributed`) must agree on
it. Both compare a :func:`fingerprint`: a JSON-able dict of

* ``weights``: SHA-256 of every tensor the model's function reads -- the selected
  parameters and the constants (frozen parameters, buffers such as BatchNorm's running
  statistics) -- with their names, dtypes and shapes, as the computation sees them (cast
  to the compute dtype);
* ``inputs``: SHA-256 of ``x1`` (and ``x2``) in the same way, after they are moved to the
  model's device and compute dtype;
* ``model`` (its class), ``params`` (the selected names), ``output_fn`` (its qualified
  name: a function's code is not hashed), ``mode``, ``dtype``, ``shape``, ``symmetric``,
  ``method`` (the engine ``auto`` resolved to), the ``device`` type and the ``torch``
  version -- what changes the kernel's bits.

Tensors are hashed in chunks of at most :data:`CHUNK_BYTES` (CUDA tensors are copied to
the host chunk by chunk), so hashing needs no second copy of the inputs.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Dict, Iterable, Tuple

import torch

from ..functional import Inputs, input_tensors

if TYPE_CHECKING:
    from .planning import KernelPlan

CHUNK_BYTES = 1 << 24


def _update(hasher: Any, label: str, tensor: torch.Tensor) -> None:
    """Feed ``label``, dtype, shape and the raw bytes of ``tensor`` to ``hasher``."""
    hasher.update(f"{label}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    raw = flat.view(torch.uint8)
    for start in range(0, raw.numel(), CHUNK_BYTES):
        hasher.update(raw[start:start + CHUNK_BYTES].cpu().numpy().data)


def digest(named: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """The SHA-256 hex digest of ``(label, tensor)`` pairs, in order."""
    hasher = hashlib.sha256()
    for label, tensor in named:
        _update(hasher, label, tensor)
    return hasher.hexdigest()


def weights_digest(params: Dict[str, torch.Tensor], constants: Dict[str, torch.Tensor]) -> str:
    """The digest of a functional model's parameters and constants (names sorted)."""
    named = [(f"param:{name}", params[name]) for name in sorted(params)]
    named += [(f"const:{name}", constants[name]) for name in sorted(constants)]
    return digest(named)


def inputs_digest(x1: Inputs, x2: Inputs, symmetric: bool) -> str:
    """The digest of the inputs (``x2`` only when it is not ``x1``)."""
    named = input_tensors(x1, "x1") + ([] if symmetric else input_tensors(x2, "x2"))
    return digest(named)


def callable_name(fn: Any) -> Any:
    """A stable name for ``output_fn`` (None stays None)."""
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def fingerprint(plan: "KernelPlan", output_fn: Any, weights: bool = True) -> Dict[str, Any]:
    """The fingerprint of the kernel ``plan`` computes (see the module docstring);
    ``weights=False`` leaves the weights' digest out (None), for ranks that hold rank 0's
    tensors by construction."""
    fmodel, engine = plan.fmodel, plan.engine
    layout = engine.layout
    return {
        "model": type(fmodel.model).__qualname__,
        "weights": weights_digest(fmodel.params, fmodel.constants) if weights else None,
        "inputs": inputs_digest(plan.x1, plan.x2, plan.symmetric),
        "params": list(fmodel.params),
        "groups": [group.name for group in plan.groups],
        "output_fn": callable_name(output_fn),
        "mode": layout.name,
        "dtype": str(fmodel.dtype).replace("torch.", ""),
        "shape": list(layout.shape(plan.n1, plan.n2, engine.num_outputs)),
        "symmetric": plan.symmetric,
        "method": engine.name,
        "device": fmodel.device.type,
        "torch": torch.__version__,
    }


def differences(found: Dict[str, Any], expected: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (found, expected)}`` for every key whose value differs (or is missing)."""
    keys = list(dict.fromkeys([*expected, *found]))
    return {key: (found.get(key), expected.get(key)) for key in keys if found.get(key) != expected.get(key)}
