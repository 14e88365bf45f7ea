r"""The empirical NTK as a linear operator: ``K V`` without forming ``K``.

For the Jacobians ``J1 = d f(x1) / d theta`` (``(N1 O) x P``) and ``J2`` of ``x2``,

* ``full``:  ``K V = J1 (J2^T V)`` for ``V`` ``(N2 O, k)``, rows ordered as
  :meth:`ntk_torch.layout.Layout.matrix` orders them (row ``j * O + b``);
* ``trace``: ``K V = sum_a J1_a (J2_a^T V)`` for ``V`` ``(N2, k)``, ``J_a`` the rows of
  output ``a`` (the kernel ``sum_a K[i, j, a, a]``);
* ``pntk``:  ``K V = g1 (g2^T V)`` with ``g = d (sum_a f_a / sqrt(O)) / d theta``, the
  sum-of-logits kernel of Mohamadi, Bae & Sutherland (2023).

Each product is one vector-Jacobian product per column over the examples of ``x2`` (in
batches, summed: a parameter-space vector ``t = J2^T v``) and then one Jacobian-vector
product ``J1 t`` over the examples of ``x1`` (in batches), the ``k`` columns batched with
``vmap``. Memory: ``k`` parameter vectors and one batch's activations per column; the
kernel is never held. ``trace`` runs its ``k O`` cotangents ``v_c e_a^T`` in the same
single vmapped pass (``O`` times the work of one ``pntk`` product, but one forward pass
and one linearisation per batch shared by all outputs and columns) and keeps output ``a``
of the product of tangent ``(c, a)``.

The parameters and buffers are a snapshot taken when the operator is built (so an operator
made at step 0 still stands for the step-0 kernel after training, BatchNorm's running
statistics included), evaluated as in eval mode.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from ..functional import FunctionalModel, Inputs, ParamSelector, batch_size, evaluation_context, slice_inputs
from ..functional import check_compatible, summed_output_fn, unwrap_model
from ..layout import DIAGONAL, layout as as_layout
from ..errors import UnsupportedModelError
from .capability import check
from .cost import default_memory_budget, parse_memory, profile_forward
from .loop import example_gradients
from .sketch import check_sketch, sketch_features

__all__ = ["NTKOperator", "OPERATOR_MODES", "as_matvec"]

OPERATOR_MODES = ("full", "trace", "pntk")
"""The operator's modes (``diagonal`` has no matrix of its own: use ``full``)."""
Params = Dict[str, torch.Tensor]
_WORKING_SET = 2**26  # bytes of activations per vmapped pass (see _examples_per_pass)


class NTKOperator:
    r"""The kernel ``K(x1, x2)`` as a matrix-free linear operator.

    ``op @ V`` computes ``K V`` for ``V`` of shape ``(N2, k)`` (``trace``, ``pntk``) or
    ``(N2 * O, k)`` (``full``), or a vector of that length, without forming ``K``
    (module docstring). ``op.shape`` is the matrix shape ``(M1, M2)``: ``(N1, N2)`` or
    ``(N1 O, N2 O)``; ``op.T`` is the operator of ``K(x2, x1) = K^T``; ``op.to_dense()``
    the matrix itself, computed by the tiled engines of :class:`~ntk_torch.NTK`.

    Args:
        model: any ``nn.Module``; where ``torch.func.vmap`` cannot run it or forward mode
            fails or disagrees with reverse mode (the dry runs of :mod:`.capability`, at
            the first product) the products loop over the examples with plain autograd
            instead (slower; ``sketch`` then refuses with a one-line error naming why).
        x1: inputs as :class:`~ntk_torch.NTK` takes them (``N1`` examples).
        x2: ``N2`` examples of the same structure, or None for ``x2 = x1`` (symmetric).
        mode: ``"trace"``, ``"full"`` or ``"pntk"``.
        params, output_fn, dtype, call_kwargs: as :class:`~ntk_torch.NTK`.
        memory_budget: bytes (int, or a string such as ``"2GB"``) for the transient
            activations of one batch of examples; default as the kernel engines'.
        batch_size: examples per pass (default from ``memory_budget`` and a measured
            forward pass; with ``k`` columns, batches of ``budget / (3 k a)`` examples
            for ``a`` activation bytes per example).
        sketch: ``d`` for the operator of the sketched kernel ``(J1 S)(J2 S)^T``, the
            kernel of ``empirical_ntk(..., sketch=d)`` with the same ``sketch_seed``:
            ``Z = J S`` ``(N, O, d)`` is computed once by ``d`` forward-mode products
            (:mod:`.sketch`) at the first product and kept, each product then costs
            ``O(N O d k)``.
        sketch_seed: seeds ``S``.

    Raises:
        ValueError / TypeError: naming the argument at fault.
    """

    def __init__(
        self,
        model: nn.Module,
        x1: Inputs,
        x2: Optional[Inputs] = None,
        *,
        mode: str = "trace",
        params: ParamSelector = None,
        output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        dtype: Optional[torch.dtype] = None,
        memory_budget: Union[int, float, str, None] = None,
        batch_size: Optional[int] = None,
        call_kwargs: Optional[Dict[str, Any]] = None,
        sketch: Optional[int] = None,
        sketch_seed: int = 0,
        _state: Optional[Tuple] = None,
    ) -> None:
        layout = as_layout(mode) if isinstance(mode, str) and mode in OPERATOR_MODES else DIAGONAL
        if layout is DIAGONAL:
            raise ValueError(f"mode must be one of {', '.join(map(repr, OPERATOR_MODES))}, got {mode!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        check_sketch(sketch, sketch_seed)
        self.mode, self.layout = layout.name, layout.computed_as
        self.sketch, self.sketch_seed, self._features = sketch, sketch_seed, None
        self._vmap_failure: Optional[str] = None  # _capability() at the first product
        self._options = dict(params=params, output_fn=output_fn, dtype=dtype, call_kwargs=call_kwargs)
        self._model = unwrap_model(model)
        if _state is not None:  # the transpose shares the snapshot
            self.fmodel, self._params, self._bytes_per_example, self.num_outputs = _state
        else:
            fn = summed_output_fn(output_fn) if layout.sums_logits else output_fn  # pntk: one output
            self.fmodel = FunctionalModel(self._model, **{**self._options, "output_fn": fn})
            self._params = {n: p.clone() for n, p in self.fmodel.params.items()}
            self._snapshot_buffers()
        self.x1 = self.fmodel.prepare_inputs(x1)
        self.n1 = _count(self.x1, "x1")
        self.symmetric = x2 is None
        self.x2 = self.x1 if x2 is None else self.fmodel.prepare_inputs(x2)
        self.n2 = self.n1 if x2 is None else _count(self.x2, "x2")
        if x2 is not None:
            check_compatible(self.x1, self.x2)
        if _state is None:
            with torch.no_grad(), evaluation_context(self._model, self.fmodel.device):
                self.num_outputs = self.fmodel.output_size(self.x1, self.n1)
                profile = profile_forward(self.fmodel, slice_inputs(self.x1, 0, 1), self.num_outputs)
            self._bytes_per_example = profile.activation_bytes
        budget = default_memory_budget(self.fmodel.device) if memory_budget is None else parse_memory(memory_budget)
        self.memory_budget = budget
        self.batch_size = batch_size
        self._memory_budget_arg = memory_budget

    def _snapshot_buffers(self) -> None:
        """Copy the buffers (BatchNorm's running statistics) into the snapshot: training
        updates them in place, and the operator stands for the kernel when it was built."""
        buffers = dict(self._model.named_buffers())
        constants = self.fmodel.constants
        constants.update({n: c.clone() for n, c in constants.items() if n in buffers})

    # ------------------------------------------------------------------ shape

    @property
    def rows_per_example(self) -> int:
        """``O`` for ``full``, 1 otherwise."""
        return self.layout.work_rows(self.num_outputs)

    @property
    def shape(self) -> Tuple[int, int]:
        r = self.rows_per_example
        return (self.n1 * r, self.n2 * r)

    @property
    def dtype(self) -> torch.dtype:
        return self.fmodel.dtype

    @property
    def device(self) -> torch.device:
        return self.fmodel.device

    @property
    def T(self) -> "NTKOperator":
        """The operator of ``K(x2, x1) = K(x1, x2)^T`` (the same parameter snapshot)."""
        if self.symmetric:
            return self
        state = (self.fmodel, self._params, self._bytes_per_example, self.num_outputs)
        return NTKOperator(
            self._model, self.x2, self.x1, mode=self.mode, memory_budget=self._memory_budget_arg,
            batch_size=self.batch_size, sketch=self.sketch, sketch_seed=self.sketch_seed, _state=state,
            **self._options,
        )

    def __repr__(self) -> str:
        return f"NTKOperator({type(self._model).__name__}, mode={self.mode!r}, shape={self.shape})"

    # ------------------------------------------------------------------ products

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.matmul(V)

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``K V`` for ``V`` ``(M2, k)`` or ``(M2,)``: ``(M1, k)`` or ``(M1,)``, in the
        operator's dtype on its device."""
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"V must be a torch.Tensor, got {type(V).__name__}")
        if V.dim() not in (1, 2) or V.shape[0] != self.shape[1]:
            raise ValueError(f"V must have shape ({self.shape[1]}, k) or ({self.shape[1]},), got {tuple(V.shape)}")
        vector = V.dim() == 1
        V = (V.unsqueeze(1) if vector else V).to(device=self.device, dtype=self.dtype)
        if V.shape[1] == 0:
            out = V.new_zeros(self.shape[0], 0)
        else:
            with torch.no_grad(), evaluation_context(self._model, self.device):
                out = self._product(V)
        return out[:, 0] if vector else out

    def _product(self, V: torch.Tensor) -> torch.Tensor:
        o, k = self.num_outputs, V.shape[1]
        if self._vmap_failure is None:
            self._vmap_failure = self._capability()
        if self._vmap_failure and self.sketch is not None:
            raise UnsupportedModelError(f"NTKOperator(sketch=...) cannot run this model: {self._vmap_failure}")
        if self.sketch is not None:
            return self._sketched_product(V)
        if self._vmap_failure:
            return self._looped_product(V)
        if not self.layout.sums_outputs:  # full
            cot = V.T.reshape(k, self.n2, o)
            return self._apply(cot, self.fmodel).reshape(k, self.n1 * o).T
        if o == 1:  # pntk (its one summed output) or a one-output trace kernel
            return self._apply(V.T.unsqueeze(-1), self.fmodel)[..., 0].T
        # trace: the k O cotangents v_c e_a^T in one vmapped pass (one forward and one
        # linearisation per batch shared by all outputs), then out_c = sum_a (J1 t_ca)_a.
        eye = torch.eye(o, dtype=V.dtype, device=V.device)
        cot = (V.T[:, None, :, None] * eye[None, :, None, :]).reshape(k * o, self.n2, o)
        res = self._apply(cot, self.fmodel).reshape(k, o, self.n1, o)
        return res.diagonal(dim1=1, dim2=3).sum(-1).T

    def _apply(self, cotangents: torch.Tensor, f: Callable[[Params, Inputs], torch.Tensor]) -> torch.Tensor:
        """``J1 J2^T c`` of ``f`` for each of the ``k`` cotangents ``c`` ``(k, N2, O')``:
        ``(k, N1, O')``."""
        params = self._params
        k = cotangents.shape[0]
        step = self._examples_per_pass(k)
        tangents = {n: p.new_zeros(k, *p.shape) for n, p in params.items()}
        for start in range(0, self.n2, step):
            xb = slice_inputs(self.x2, start, min(start + step, self.n2))
            _, pullback = vjp(lambda p: f(p, xb), params)
            part = vmap(pullback)(cotangents[:, start:start + step])[0]
            for name, t in part.items():
                tangents[name] += t
        outputs = []
        for start in range(0, self.n1, step):
            xa = slice_inputs(self.x1, start, min(start + step, self.n1))

            def column(tangent, xa=xa):
                return jvp(lambda p: f(p, xa), (params,), (tangent,))[1]

            outputs.append(vmap(column, randomness="same")(tangents))
        return torch.cat(outputs, dim=1)

    def _capability(self) -> str:
        """Why the vmapped vjp-then-jvp products cannot run on this model ("" when they
        can): ``vmap`` fails, or forward mode fails or disagrees with reverse mode (e.g. an
        embedding's ``padding_idx``), by the dry runs of :mod:`.capability`."""
        x_one = slice_inputs(self.x1, 0, 1)
        for name, what in (("vmap", "torch.func.vmap"), ("forward_mode", "forward-mode AD")):
            reason = check(name, self.fmodel, x_one)
            if reason:
                return f"{what} fails: {reason}"
        return ""

    def _looped_product(self, V: torch.Tensor) -> torch.Tensor:
        """``K V`` without ``vmap`` (for models it cannot run): each example's Jacobian
        ``(O, P)`` from plain autograd, one backward pass per output (``loop.example_gradients``),
        contracted into ``t = J2^T V`` (``trace``: one ``t`` per output) and then ``J1 t``;
        one example's Jacobian and ``t`` in memory, ``(N1 + N2) O`` backward passes."""
        o, k = self.num_outputs, V.shape[1]
        full = not self.layout.sums_outputs
        t = V.new_zeros(_flat_size(self._params), k) if full else V.new_zeros(o, _flat_size(self._params), k)
        for j in range(self.n2):
            g = self._example_jacobian(self.x2, j)  # (O, P)
            if full:
                t += g.T @ V[j * o:(j + 1) * o]
            else:
                t += g[:, :, None] * V[j][None, None, :]
        rows = []
        for i in range(self.n1):
            g = self._example_jacobian(self.x1, i)
            rows.append(g @ t if full else torch.einsum("ap,apk->k", g, t)[None])
        return torch.cat(rows, dim=0)

    def _example_jacobian(self, x: Inputs, i: int) -> torch.Tensor:
        rows = example_gradients(self.fmodel, slice_inputs(x, i, i + 1), self._params)
        return torch.stack([torch.cat([g.reshape(-1) for g in row.values()]) for row in rows])

    def _sketched_product(self, V: torch.Tensor) -> torch.Tensor:
        """``Z1 (Z2^T V)`` with ``Z = J S`` ``(N, O, d)`` computed once (:mod:`.sketch`):
        ``full`` over the ``(N O) x d`` rows, ``trace`` (and ``pntk``, ``O = 1``) summed
        over the outputs, ``sum_a Z1[:, a] (Z2[:, a]^T V)``."""
        if self._features is None:
            args = (self.sketch, self.sketch_seed, self.memory_budget, self._params)
            z1 = sketch_features(self.fmodel, self.x1, *args)
            self._features = (z1, z1 if self.symmetric else sketch_features(self.fmodel, self.x2, *args))
        z1, z2 = self._features
        if not self.layout.sums_outputs:  # full
            return z1.reshape(-1, z1.shape[2]) @ (z2.reshape(-1, z2.shape[2]).T @ V)
        return torch.einsum("iad,adk->ik", z1, torch.einsum("jad,jk->adk", z2, V))

    def _examples_per_pass(self, k: int) -> int:
        """Examples per pass for ``k`` vmapped columns: within the memory budget, and at
        most a ``_WORKING_SET`` of activations per pass (larger passes are bound by memory
        bandwidth, not arithmetic, and run slower on CPU)."""
        if self.batch_size is not None:
            return self.batch_size
        per_example = 3 * k * max(self._bytes_per_example, 1)
        return max(1, min(self.memory_budget, _WORKING_SET) // per_example)

    # ------------------------------------------------------------------ dense

    def to_dense(self) -> torch.Tensor:
        """The matrix ``(M1, M2)``: the kernel of :class:`~ntk_torch.NTK` (tiled) in the
        layout's matrix view (``full``: rows ``i * O + a``)."""
        from .api import NTK  # api imports the engines; the operator only needs it here

        ntk = NTK(self._model, mode=self.mode, memory_budget=self._memory_budget_arg, sketch=self.sketch,
                  sketch_seed=self.sketch_seed, **self._options)
        buffers = dict(self._model.named_buffers())
        snapshot = {**self._params, **{n: c for n, c in self.fmodel.constants.items() if n in buffers}}
        with _parameters(self.fmodel, snapshot):
            K = ntk(self.x1, None if self.symmetric else self.x2)
        return ntk.options.layout.matrix(K)


class _parameters:
    """Temporarily give the model the snapshot's parameter and buffer values (for
    :meth:`NTKOperator.to_dense`)."""

    def __init__(self, fmodel: FunctionalModel, snapshot: Params):
        self.fmodel, self.snapshot = fmodel, snapshot
        self.named = {**dict(fmodel.model.named_parameters()), **dict(fmodel.model.named_buffers())}

    def __enter__(self) -> None:
        self.saved = {n: self.named[n].detach().clone() for n in self.snapshot}
        with torch.no_grad():
            for n, value in self.snapshot.items():
                self.named[n].copy_(value)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for n, value in self.saved.items():
                self.named[n].copy_(value)


def _flat_size(params: Params) -> int:
    return sum(p.numel() for p in params.values())


def _count(x: Inputs, name: str) -> int:
    n = batch_size(x, name)
    if n < 1:
        raise ValueError(f"{name} must hold at least one example, got {n}")
    return n


def as_matvec(op: Any, name: str = "op") -> Tuple[Tuple[int, int], Callable, Callable, torch.dtype, torch.device]:
    """``(shape, matmul, rmatmul, dtype, device)`` for an :class:`NTKOperator` or a 2-D
    Tensor: ``matmul(V) = A V`` and ``rmatmul(V) = A^T V`` for ``V`` ``(M, k)``.

    Raises:
        TypeError: ``op`` is neither.
    """
    if isinstance(op, NTKOperator):
        transpose = op.T
        return op.shape, op.matmul, transpose.matmul, op.dtype, op.device
    if isinstance(op, torch.Tensor) and op.dim() == 2:
        return tuple(op.shape), lambda V: op @ V.to(op.dtype), lambda V: op.T @ V.to(op.dtype), op.dtype, op.device
    kind = f"a Tensor of shape {tuple(op.shape)}" if isinstance(op, torch.Tensor) else type(op).__name__
    raise TypeError(f"{name} must be an ntk_torch.NTKOperator or a 2-D torch.Tensor, got {kind}")
