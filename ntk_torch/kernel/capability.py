"""Which ways of differentiating a model run on it: dry runs on one example.

The engines differentiate the model in up to three ways besides plain autograd (``autograd``:
one reverse pass, no function transform, what the loop engine does), and a model may
support some only:

* ``vmap`` -- per-example reverse mode vectorised with ``torch.func.vmap`` (the Jacobian
  engine, the NTK-vector products' tangents, the structured capture). It cannot run
  data-dependent control flow (``if mask.all():`` in Hugging Face's masking utilities),
  ``torch.utils.checkpoint`` (saved-tensor hooks), the in-place state updates of
  ``nn.LSTM``/``nn.GRU``/``nn.RNN`` or sparse gradients (``nn.Embedding(sparse=True)``).
* ``forward_mode`` -- ``torch.func.jvp``, which the NTK-vector products use for columns.
  It must exist for every operation (``weight_norm``'s ``_weight_norm_interface`` has
  none) and agree with reverse mode, which fails where an operation's reverse derivative
  is a convention: ``F.embedding``'s ``padding_idx`` row gets no gradient but its forward
  derivative is not zero (wrong wherever the table is also used elsewhere, e.g. tied to
  the output layer), ``scale_grad_by_freq`` rescales only reverse mode. The dry run
  compares ``<v, J t>`` with ``<J^T v, t>`` for random ``v`` and ``t`` (which catches any
  disagreement on that example) and watches for those known operations (which catches
  them on every example).
* ``reverse_products`` -- ``J t`` as the vector-Jacobian product of ``u -> J^T u``
  (reverse over reverse), the NTK-vector products' construction where forward mode
  fails; it needs double backward.

Each check returns ``None`` when the way runs, else one line saying where and why
(:class:`~ntk_torch.failures.Failure`, plus a known cause when one was seen). A failure
is only blamed on the transform when it is deterministic and the model runs without it:
the dry run is repeated (a failure that does not repeat is the model's own and is raised
again), and the model is differentiated once with plain autograd, where a failure raises
:class:`~ntk_torch.errors.UnsupportedModelError` (no engine can differentiate it; e.g.
``torch.utils.checkpoint(use_reentrant=True)``, which does not support
``torch.autograd.grad``). The caller provides eval mode and a forked RNG.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch.func import jvp, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedModelError
from ..failures import Locator, locate
from ..functional import FunctionalModel, Inputs

CHECKS = ("autograd", "vmap", "forward_mode", "reverse_products")

#: Relative disagreement of ``<v, J t>`` and ``<J^T v, t>`` (in units of the compute
#: dtype's epsilon) above which forward and reverse mode are taken to differ.
AGREEMENT_EPS = 1e3


# ---------------------------------------------------------------------------------------
# Known operations
# ---------------------------------------------------------------------------------------

_EMBEDDING_SIGNATURES = {
    F.embedding: inspect.signature(F.embedding),
    F.embedding_bag: inspect.signature(F.embedding_bag),
}


class _KnownOps(TorchFunctionMode):
    """Notes embedding calls whose derivatives are conventions (see the module docstring),
    and whether each table looked up with a ``padding_idx`` is used by any other call."""

    def __init__(self, locator: Locator):
        super().__init__()
        self.locator = locator
        self.sparse: Dict[str, None] = {}
        self.by_frequency: Dict[str, None] = {}
        self.padded: Dict[int, str] = {}  # id(table) -> where it is looked up with padding
        self._padded_calls: Dict[int, int] = {}
        self._uses: Dict[int, int] = {}

    def _where(self) -> str:
        stack = self.locator.stack
        return stack[-1].label if stack else "the model"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        signature = _EMBEDDING_SIGNATURES.get(func)
        if signature is not None:
            bound = signature.bind(*args, **kwargs).arguments
            where = self._where()
            if bound.get("sparse"):
                self.sparse[f"{where} uses sparse gradients (sparse=True)"] = None
            if bound.get("scale_grad_by_freq"):
                self.by_frequency[f"{where} scales gradients by frequency (scale_grad_by_freq=True)"] = None
            if bound.get("padding_idx") is not None:
                table = id(bound["weight"])
                self.padded.setdefault(table, where)
                self._padded_calls[table] = self._padded_calls.get(table, 0) + 1
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._uses[id(t)] = self._uses.get(id(t), 0) + 1
        return func(*args, **kwargs)

    def forward_mode_notes(self) -> List[str]:
        """Why forward mode would disagree with reverse mode on some example."""
        notes = list(self.by_frequency)
        for table, where in self.padded.items():
            if self._uses.get(table, 0) > self._padded_calls[table]:
                notes.append(
                    f"{where} has a padding_idx and its table is also used elsewhere (a tied "
                    "weight): F.embedding's forward-mode derivative includes the padding row, "
                    "reverse mode gives it none"
                )
        return notes


# ---------------------------------------------------------------------------------------
# The dry runs
# ---------------------------------------------------------------------------------------

def _vmap_dry_run(fmodel: FunctionalModel, x_one: Inputs) -> None:
    """What the vmap engines do, on one example and two cotangents: ``vmap`` over the
    example of a ``vjp`` whose pullback is ``vmap``-ed over the cotangents."""

    def per_example(x):
        out, pull = vjp(lambda p: fmodel.single(p, x), fmodel.params)
        cotangents = torch.ones((2,) + out.shape, dtype=out.dtype, device=out.device)
        return vmap(pull)(cotangents)

    vmap(per_example, randomness="different")(x_one)


def _plain_dry_run(fmodel: FunctionalModel, x_one: Inputs) -> None:
    """One reverse pass with plain autograd (no function transform)."""
    params = {name: p.detach().requires_grad_(True) for name, p in fmodel.params.items()}

    def backward(out: torch.Tensor) -> None:
        torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True)

    with torch.enable_grad():
        fmodel.with_output(params, x_one, backward)


def _random_like(tensors: Dict[str, torch.Tensor], generator: torch.Generator) -> Dict[str, torch.Tensor]:
    return {
        name: torch.randn((2,) + t.shape, generator=generator, dtype=t.dtype, device=t.device)
        for name, t in tensors.items()
    }


@contextlib.contextmanager
def _same_draws(device: torch.device) -> Iterator[Callable[[], None]]:
    """``replay()`` puts the RNG back to where it was at the start of the block, so two
    passes of a model that samples in eval mode draw the same numbers."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    yield replay


def _dot(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``<a_k, b_k>`` for each of the two stacked entries ``k``: ``(2,)``."""
    return sum((a[n] * b[n]).flatten(1).sum(1) for n in a)


def _forward_mode_dry_run(fmodel: FunctionalModel, x_one: Inputs) -> Optional[str]:
    """Compare ``<v, J t>`` (jvp, ``vmap``-ed over two tangents as the engine does) with
    ``<J^T v, t>`` (vjp); the disagreement, or None."""
    params = fmodel.params
    generator = torch.Generator(device=fmodel.device).manual_seed(0)
    tangents = _random_like(params, generator)

    def f(p):
        return fmodel(p, x_one)

    with _same_draws(fmodel.device) as replay:
        columns = vmap(lambda t: jvp(f, (params,), (t,))[1], randomness="same")(tangents)
        replay()
        out, pull = vjp(f, params)
    cotangents = torch.randn((2,) + out.shape, generator=generator, dtype=out.dtype, device=out.device)
    rows = vmap(pull)(cotangents)[0]
    forward = (cotangents * columns).flatten(1).sum(1)
    reverse = _dot(rows, tangents)
    scale = (cotangents.flatten(1).norm(dim=1) * columns.flatten(1).norm(dim=1)
             + torch.sqrt(_dot(rows, rows)) * torch.sqrt(_dot(tangents, tangents)))
    tolerance = AGREEMENT_EPS * torch.finfo(fmodel.dtype).eps
    gap = (forward - reverse).abs()
    if bool((gap <= tolerance * scale).all()):
        return None
    k = int(gap.argmax())
    return (
        f"forward and reverse mode disagree on x1's first example: <v, J t> = {float(forward[k]):.6g} "
        f"but <J^T v, t> = {float(reverse[k]):.6g}"
    )


def _reverse_products_dry_run(fmodel: FunctionalModel, x_one: Inputs) -> None:
    """``J t`` by reverse over reverse, ``vmap``-ed over two tangents."""
    params = fmodel.params
    generator = torch.Generator(device=fmodel.device).manual_seed(0)
    tangents = _random_like(params, generator)
    vmap(column_by_reverse_mode(lambda p: fmodel(p, x_one), params), randomness="same")(tangents)


def column_by_reverse_mode(f: Callable, primals: Dict[str, torch.Tensor]) -> Callable:
    """``t -> J t`` for ``f(primals)`` without forward mode: ``J t`` is the vector-Jacobian
    product, with cotangent ``t``, of the linear map ``u -> J^T u`` (itself a vjp)."""
    out, pull = vjp(f, primals)
    zeros = torch.zeros_like(out)
    _, pull_twice = vjp(lambda u: pull(u)[0], zeros)
    return lambda tangent: pull_twice(tangent)[0]


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------

def _failed(run: Callable[[], Optional[str]], fmodel: FunctionalModel, x_one: Inputs) -> Optional[str]:
    """``run()`` under a locator: None when it succeeds and reports nothing, else the
    reason. A failure that does not repeat is the model's own error and is raised again;
    one that plain autograd shares is raised by :func:`_check_autograd`."""
    try:
        with locate(fmodel.model) as locator, _quiet():
            return run()
    except Exception as error:
        failure, first = locator.failure(error), error
    try:
        with _quiet():
            run()
    except Exception:
        pass
    else:
        raise first  # not deterministic: not the transform's doing
    _check_autograd(fmodel, x_one)
    return str(failure)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings from a dry run (torch's about batching rules it falls back from): the
    kernel's own passes give them if they matter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_autograd(fmodel: FunctionalModel, x_one: Inputs) -> None:
    """Raise :class:`~ntk_torch.errors.UnsupportedModelError` naming the layer and the
    operation where plain autograd cannot differentiate the model (no engine can), or the
    model's own error where it does not repeat."""
    try:
        with locate(fmodel.model) as locator:
            _plain_dry_run(fmodel, x_one)
        return
    except Exception as error:
        failure, first = locator.failure(error), error
    try:
        _plain_dry_run(fmodel, x_one)
    except Exception:
        pass
    else:
        raise first
    raise UnsupportedModelError(
        f"no engine can differentiate this model: autograd fails on x1's first example in {failure}"
    ) from first


def check(name: str, fmodel: FunctionalModel, x_one: Inputs) -> Optional[str]:
    """The check ``name`` (one of :data:`CHECKS`) on the first example ``x_one`` (a batch
    of one): None when that way of differentiating runs, else why not."""
    if name == "autograd":
        _check_autograd(fmodel, x_one)
        return None
    if name == "vmap":
        reason = _failed(lambda: _vmap_dry_run(fmodel, x_one), fmodel, x_one)
        return None if reason is None else "; ".join([reason, *_known_ops(fmodel, x_one).sparse])
    if name == "forward_mode":
        notes = _known_ops(fmodel, x_one).forward_mode_notes()
        reason = _failed(lambda: _forward_mode_dry_run(fmodel, x_one), fmodel, x_one)
        return "; ".join(([reason] if reason else []) + notes) or None
    if name == "reverse_products":
        return _failed(lambda: _reverse_products_dry_run(fmodel, x_one), fmodel, x_one)
    raise ValueError(f"unknown check {name!r}; expected one of {CHECKS}")


def _known_ops(fmodel: FunctionalModel, x_one: Inputs) -> _KnownOps:
    """The known operations of a forward pass on ``x_one``."""
    with locate(fmodel.model) as locator, _KnownOps(locator) as known, torch.no_grad():
        fmodel(fmodel.params, x_one)
    return known
