"""The configured kernel function :class:`NTK`, and ``empirical_ntk`` / ``explain`` on top."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import NonFiniteKernelError
from ..functional import FunctionalModel, Inputs, ParamSelector, evaluation_context, slice_inputs
from ..layout import layout as as_layout
from .analysis import AnalysisMemo
from .cost import parse_memory
from .engine import Engine
from .explain import StructuredReport, structured_report
from .jacobian import JacobianEngine
from .planning import METHODS, TOTAL, KernelOptions, KernelPlan, functional_view, plan_kernel
from .structured import StructuredEngine
from .tiling import NonFiniteBlock, compute_kernel

logger = logging.getLogger("ntk_torch.kernel")

MemorySize = Union[int, float, str]


class PerLayerKernels(Mapping[str, torch.Tensor]):
    """The kernel of each parameter group (module path), and their sum.

    A read-only mapping ``{group name: kernel}`` in parameter order; ``.total`` is the
    kernel of all the selected parameters, equal to the sum of the parts.
    """

    def __init__(self, parts: Dict[str, torch.Tensor], total: torch.Tensor):
        self._parts = dict(parts)
        self.total = total

    def __getitem__(self, group: str) -> torch.Tensor:
        return self._parts[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def __repr__(self) -> str:
        shape = tuple(self.total.shape)
        return f"PerLayerKernels(groups={list(self._parts)}, shape={shape})"


class NTK:
    r"""The empirical neural tangent kernel of one model, configured once.

    .. math::
        \Theta(x, x')_{ab} = \sum_p \frac{\partial f_a(x)}{\partial\theta_p}
                                    \frac{\partial f_b(x')}{\partial\theta_p}

    (Jacot et al. 2018), over the trainable parameters ``theta`` of ``model`` (each tied
    tensor once), with the model evaluated as in eval mode. Every option is checked here,
    once; ``ntk(x1, x2)`` then computes kernels of the parameters *as they are at that
    call* (train the model and call again), and remembers what it measured about the
    model (output size, forward cost, structured coverage) while the model's structure and
    the inputs' feature shapes stay the same (:mod:`.analysis`). The module's mode, the RNG
    states and every ``.grad`` are left as they were, also when an error is raised::

        kernel = ntk_torch.NTK(model, mode="trace", method="auto")
        K0 = kernel(x_probe)                      # (N, N)
        ...  # training
        K = kernel(x_probe)                       # the same analysis, new parameters

    Args:
        model: any ``nn.Module``; called through ``torch.func.functional_call`` with its
            parameters and buffers.
        mode: the layout (:mod:`ntk_torch.layout`): ``"full"`` -> ``(N1, N2, O, O)``;
            ``"trace"`` -> ``(N1, N2)``, the sum over ``o`` of ``K[i, j, o, o]``;
            ``"diagonal"`` -> ``(N1, N2, O)``. ``O`` is the number of output values per
            example (``prod(out)`` for outputs ``(N, *out)``). ``trace`` and ``diagonal``
            never build the full kernel.
        method: ``"jacobian"`` (Jacobian contraction), ``"ntk_vp"`` (NTK-vector
            products), ``"structured"`` (rules per module type and per torch function --
            Linear, convolutions, embeddings, norms, attention projections through
            ``F.linear``, ... --, Jacobian contraction for other parameters; see
            :meth:`explain` and :mod:`ntk_torch.kernel.rules`)
            or ``"auto"``, which picks the cheapest by the cost model of Novak et al. 2022
            on FLOPs measured for one forward pass.
        params: narrow the parameters: glob pattern(s) on parameter names or module paths
            (``"layers.0.*"``, ``"*.bias"``), module(s), or a list mixing both.
        output_fn: maps the model's output to a ``(N, *out)`` Tensor (for models returning
            tuples, dicts or objects).
        per_layer: return a :class:`PerLayerKernels` mapping each parameter group (the
            path of the module owning the parameters) to its kernel, with ``.total``.
        dtype: compute dtype (e.g. ``torch.float64``); the model itself is not touched.
        memory_budget: peak extra bytes for one block (int or a string like ``"2GB"``);
            default a quarter of free host memory (half of free CUDA memory) at each call.
        batch_size: the largest block of examples per side.
        progress: show a tqdm progress bar over blocks.

    Raises:
        ValueError / TypeError: naming the argument at fault.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "full",
        method: str = "auto",
        params: ParamSelector = None,
        output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        per_layer: bool = False,
        dtype: Optional[torch.dtype] = None,
        memory_budget: Optional[MemorySize] = None,
        batch_size: Optional[int] = None,
        progress: bool = False,
    ) -> None:
        layout = as_layout(mode)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        for name, flag in (("per_layer", per_layer), ("progress", progress)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int):
                raise TypeError(f"batch_size must be a positive int or None, got {batch_size!r}")
            if batch_size < 1:
                raise ValueError(f"batch_size must be a positive int or None, got {batch_size}")
        budget = None if memory_budget is None else parse_memory(memory_budget)
        self.options = KernelOptions(
            model, layout, method, params, output_fn, per_layer, dtype, budget, batch_size, progress
        )
        functional_view(self.options)  # checks model, params, output_fn and dtype now
        self._memo = AnalysisMemo()

    @property
    def model(self) -> nn.Module:
        return self.options.model

    @property
    def mode(self) -> str:
        return self.options.layout.name

    @property
    def method(self) -> str:
        return self.options.method

    def view(self) -> FunctionalModel:
        """The model as a function of the selected parameters, as they are now."""
        return functional_view(self.options)

    def __call__(self, x1: Inputs, x2: Optional[Inputs] = None) -> Union[torch.Tensor, PerLayerKernels]:
        """The kernel between ``x1`` and ``x2``.

        Args:
            x1: a Tensor, tuple of Tensors (``model(*x1)``) or dict of Tensors
                (``model(**x1)``), batched on dim 0: ``N1`` examples.
            x2: the same structure and feature shapes as ``x1`` with ``N2`` examples, or
                ``None`` for ``x2 = x1``, computed once per block pair and exactly
                symmetric.

        Returns:
            The kernel on the model's device in the compute dtype (layout ``mode``), or a
            :class:`PerLayerKernels` when ``per_layer=True``.

        Raises:
            ValueError / TypeError: naming the argument at fault.
            NonFiniteKernelError: the kernel has NaN/inf entries; names the parameter groups.
        """
        options = self.options
        fmodel = functional_view(options)
        with torch.no_grad(), evaluation_context(options.model, fmodel.device):
            plan = plan_kernel(options, self._memo, fmodel, x1, x2)
            engine = plan.engine
            logger.debug(
                "NTK: method=%s mode=%s N1=%d N2=%d O=%d P=%d block=%d budget=%d",
                engine.name, self.mode, plan.n1, plan.n2, plan.analysis.num_outputs,
                plan.analysis.profile.num_params, plan.block_size, plan.budget,
            )
            try:
                kernels = compute_kernel(
                    engine, plan.x1, plan.x2, plan.n1, plan.n2, plan.block_size, plan.symmetric,
                    options.progress,
                )
            except NonFiniteBlock as failure:
                raise NonFiniteKernelError(_nonfinite_groups(plan, failure)) from None
        if not options.per_layer:
            return kernels[TOTAL]
        parts = iter(kernels.values())
        total = next(parts).clone()
        for part in parts:
            total += part
        return PerLayerKernels(kernels, total)

    def explain(self, x1: Inputs, x2: Optional[Inputs] = None) -> StructuredReport:
        """How the structured engine would compute ``self(x1, x2)``, computing no kernel.

        Analyses the model (one forward pass on one and on two examples) and reports, for
        each module whose parameters a rule covers, the rule and the strategy chosen for
        the planned block size with both strategies' estimated FLOPs (Novak et al. 2022),
        which parameters fall back to Jacobian contraction and why, and the method the
        ``method`` option resolves to. ``str(report)`` is a readable table.
        """
        options = self.options
        fmodel = functional_view(options)
        with torch.no_grad(), evaluation_context(options.model, fmodel.device):
            plan = plan_kernel(options, self._memo, fmodel, x1, x2, method=StructuredEngine.name)
        return structured_report(plan, options.method)

    def __repr__(self) -> str:
        o = self.options
        return f"NTK({type(o.model).__name__}, mode={self.mode!r}, method={o.method!r}, per_layer={o.per_layer})"


def _nonfinite_groups(plan: KernelPlan, failure: NonFiniteBlock):
    """The parameter groups whose contribution to the failing block is not finite.

    Diagnosed per group with reverse mode (Jacobian contraction) whatever the engine:
    forward mode turns zero tangents through infinite weights into NaN, which would
    blame groups whose own contribution is finite.
    """
    engine: Engine = plan.engine
    if isinstance(engine, JacobianEngine) and failure.groups != [TOTAL]:
        return failure.groups
    diagnosis = JacobianEngine(
        engine.fmodel, engine.layout, engine.fmodel.groups, engine.profile, engine.memory_budget
    )
    rows = diagnosis.prepare_rows(slice_inputs(plan.x1, *failure.rows))
    cols = diagnosis.prepare_cols(slice_inputs(plan.x2, *failure.cols))
    blocks = diagnosis.contract(rows, cols)
    bad = [name for name, block in blocks.items() if not torch.isfinite(block).all()]
    return bad or [TOTAL]


def empirical_ntk(
    model: nn.Module,
    x1: Inputs,
    x2: Optional[Inputs] = None,
    *,
    mode: str = "full",
    method: str = "auto",
    params: ParamSelector = None,
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    per_layer: bool = False,
    batch_size: Optional[int] = None,
    memory_budget: Optional[MemorySize] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> Union[torch.Tensor, PerLayerKernels]:
    r"""The empirical neural tangent kernel of ``model`` between ``x1`` and ``x2``.

    ``NTK(model, **options)(x1, x2)``: see :class:`NTK` for the formula, every option and
    the errors. To compute kernels of one model repeatedly (during training, say), build
    the :class:`NTK` once and call it: the options are then checked and the model analysed
    only once.

    Returns:
        ``(N1, N2, O, O)`` (``mode="full"``), ``(N1, N2)`` (``"trace"``) or
        ``(N1, N2, O)`` (``"diagonal"``) on the model's device in the compute dtype, or a
        :class:`PerLayerKernels` when ``per_layer=True``.
    """
    kernel = NTK(
        model, mode=mode, method=method, params=params, output_fn=output_fn, per_layer=per_layer,
        dtype=dtype, memory_budget=memory_budget, batch_size=batch_size, progress=progress,
    )
    return kernel(x1, x2)


def explain(
    model: nn.Module,
    x1: Inputs,
    x2: Optional[Inputs] = None,
    *,
    mode: str = "full",
    method: str = "auto",
    params: ParamSelector = None,
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    per_layer: bool = False,
    batch_size: Optional[int] = None,
    memory_budget: Optional[MemorySize] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> StructuredReport:
    """How the structured engine would compute ``empirical_ntk(model, x1, x2, ...)``:
    ``NTK(model, **options).explain(x1, x2)`` (see :meth:`NTK.explain`)."""
    kernel = NTK(
        model, mode=mode, method=method, params=params, output_fn=output_fn, per_layer=per_layer,
        dtype=dtype, memory_budget=memory_budget, batch_size=batch_size, progress=progress,
    )
    return kernel.explain(x1, x2)
