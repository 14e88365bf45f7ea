"""The configured kernel function :class:`NTK`, and ``empirical_ntk`` / ``explain`` on top."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import NonFiniteKernelError, UnsupportedModelError
from ..failures import first_line
from ..functional import (
    FunctionalModel, Inputs, ParamSelector, check_call_kwargs, evaluation_context, slice_inputs, summed_output_fn,
    unwrap_model,
)
from ..layout import layout as as_layout
from .analysis import AnalysisMemo
from .cost import default_memory_budget, parse_memory
from .execution import compute, nonfinite_error, scale_options
from .explain import StructuredReport, engine_notes, structured_report
from .gathering import KernelShard
from .planning import METHODS, TOTAL, KernelOptions, KernelPlan, functional_view, plan_kernel, replan_without_vmap
from .sketch import check_sketch, sketched_kernel
from .structured import StructuredEngine
from .tiling import NonFiniteBlock, compute_kernel

logger = logging.getLogger("ntk_torch.kernel")

MemorySize = Union[int, float, str]
KernelResult = Union[torch.Tensor, "PerLayerKernels", KernelShard, None]


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
            parameters and buffers. A ``torch.compile``'d module, ``DistributedDataParallel``,
            ``DataParallel`` or FSDP wrapper is unwrapped (the kernel is of the module
            inside, called eagerly: the compiled one is never recompiled).
        mode: the layout (:mod:`ntk_torch.layout`): ``"full"`` -> ``(N1, N2, O, O)``;
            ``"trace"`` -> ``(N1, N2)``, the sum over ``o`` of ``K[i, j, o, o]``;
            ``"diagonal"`` -> ``(N1, N2, O)``; ``"pntk"`` -> ``(N1, N2)``, the
            sum-of-logits kernel ``(1/O) sum_{a,b} K[i, j, a, b]`` (Mohamadi et al. 2023),
            one backward pass per example. ``O`` is the number of output values per
            example (``prod(out)`` for outputs ``(N, *out)``). ``trace``, ``diagonal`` and
            ``pntk`` never build the full kernel.
        method: ``"jacobian"`` (Jacobian contraction), ``"ntk_vp"`` (NTK-vector
            products), ``"structured"`` (rules per module type and per torch function --
            Linear, convolutions, embeddings, norms, attention projections through
            ``F.linear``, ... --, Jacobian contraction for other parameters; see
            :meth:`explain` and :mod:`ntk_torch.kernel.rules`),
            ``"loop"`` (Jacobian contraction of per-example Jacobians from plain autograd,
            no ``vmap``: for masks with data-dependent control flow, RNNs, checkpointing)
            or ``"auto"``, which picks the cheapest by the cost model of Novak et al. 2022
            on FLOPs measured for one forward pass, among the engines that can run the
            model (a dry run on one example; where ``torch.func.vmap`` cannot, it warns
            once and uses the loop engine or the structured engine's per-example capture).
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
        progress: show a tqdm progress bar over blocks (on rank 0 when distributed).
        distributed: share the block tiles out over the ranks of the default
            ``torch.distributed`` process group (gloo on CPU, NCCL on CUDA; launched with
            ``torchrun``): balanced contiguous runs of the row-major list of block pairs
            (for ``x2=None`` only the upper block triangle exists), each rank computing
            its own on its model's device. Every rank must make the same call with the
            same inputs (checked by hash); the kernel is that of rank 0's parameters and
            buffers, which every rank receives (its own model untouched).
        process_group: a ``torch.distributed.ProcessGroup`` to distribute over (implies
            ``distributed``).
        gather: who receives the assembled kernel: ``"all"`` (every rank; the default),
            ``"rank0"`` (rank 0; the others get None) or ``"none"`` (each rank gets a
            :class:`~.gathering.KernelShard`: its own tiles with their example ranges).
            With ``out=``, who receives the file's kernel (``"none"``: nobody).
        out: a ``.npy`` file to write the kernel into, tile by tile, through memory maps
            (:mod:`.store`): the kernel need not fit in memory, and the call returns it
            as a CPU tensor over a copy-on-write map of the file. The file appears only
            when complete (it is written as ``out.partial``); a progress record
            ``out.progress.json`` (and ``out.tiles``) beside it says which tiles are done
            and what was asked for. With ``distributed``, every rank writes its own tiles
            (all ranks on one machine).
        resume: with ``out=``, continue an interrupted computation to the identical
            result (with the recorded tiling and memory budget), or return the kernel
            already complete; a record made for another request (weights, inputs, mode,
            dtype, shape, method) is refused. Without ``resume``, an existing ``out`` is
            an error.
        sketch: ``d`` for the sketched kernel ``(J1 S)(J2 S)^T`` with a seeded Gaussian
            projection ``S`` (``P x d``, ``E[S S^T] = I``): unbiased, relative error about
            ``1/sqrt(d)``, computed by ``d`` forward-mode products, never forming ``J``
            (:mod:`.sketch`); for models with many parameters. ``method`` is then unused;
            not with ``per_layer``, ``distributed`` or ``out``.
        sketch_seed: seeds ``S`` (the same seed, the same projection).
        call_kwargs: keyword arguments that are not batched, passed unchanged to every call
            of the model (``use_cache=False``, a shared mask); Tensors among them are moved
            to the model's device and floating ones cast to ``dtype``, never
            differentiated. Batched arguments go in ``x1``/``x2``.

    Raises:
        ValueError / TypeError: naming the argument at fault.
        UnsupportedModelError: (at a call) ``method`` cannot run this model.
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
        call_kwargs: Optional[Mapping[str, Any]] = None,
        distributed: bool = False,
        process_group: Any = None,
        gather: str = "all",
        out: Union[str, "os.PathLike[str]", None] = None,
        resume: bool = False,
        sketch: Optional[int] = None,
        sketch_seed: int = 0,
    ) -> None:
        check_sketch(sketch, sketch_seed)
        if sketch is not None and (per_layer or distributed or out is not None):
            raise ValueError("sketch does not combine with per_layer, distributed or out; drop one of them")
        self._sketch = (sketch, sketch_seed)
        model = unwrap_model(model)
        layout = self._layout = as_layout(mode)
        if layout.sums_logits:  # pntk: the trace kernel of the summed logits
            output_fn, layout = summed_output_fn(output_fn), layout.computed_as
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
        scale = scale_options(distributed, process_group, gather, out, resume, per_layer)
        self.options = KernelOptions(
            model, layout, method, params, output_fn, per_layer, dtype, budget, batch_size, progress,
            check_call_kwargs(call_kwargs), scale,
        )
        functional_view(self.options)  # checks model, params, output_fn, dtype and call_kwargs now
        self._memo = AnalysisMemo()

    @property
    def model(self) -> nn.Module:
        return self.options.model

    @property
    def mode(self) -> str:
        return self._layout.name

    @property
    def method(self) -> str:
        return self.options.method

    def view(self) -> FunctionalModel:
        """The model as a function of the selected parameters, as they are now."""
        return functional_view(self.options)

    def __call__(self, x1: Inputs, x2: Optional[Inputs] = None) -> KernelResult:
        """The kernel between ``x1`` and ``x2``.

        Args:
            x1: a Tensor (``model(x1)``), a tuple or list (``model(*x1)``) or a dict
                (``model(**x1)``) whose entries are Tensors or nested tuples, lists and
                dicts of Tensors, every Tensor batched on dim 0: ``N1`` examples
                (``(batch_dict,)`` calls ``model(batch_dict)``). Integer and bool tensors
                (token ids, masks) are passed as they are, never differentiated or cast.
            x2: the same structure and feature shapes as ``x1`` with ``N2`` examples, or
                ``None`` for ``x2 = x1``, computed once per block pair and exactly
                symmetric.

        Returns:
            The kernel on the model's device in the compute dtype (layout ``mode``), or a
            :class:`PerLayerKernels` when ``per_layer=True``. With ``out=``, a CPU tensor
            over the finished file. With ``gather="rank0"``, None on the other ranks; with
            ``gather="none"`` in memory, this rank's :class:`~.gathering.KernelShard`
            (with ``out=``, None).

        Raises:
            ValueError / TypeError: naming the argument at fault; an exception the model
                raises on the first examples of ``x1`` names ``x1``, the layer and operation.
            UnsupportedModelError: ``method`` cannot run this model (names the layer, the
                operation and the method that can).
            NonFiniteKernelError: the kernel has NaN/inf entries; names the input at
                fault when ``x1`` or ``x2`` holds NaN/inf (checked first), else the
                parameter groups.
            FileExistsError / KernelStoreError: ``out`` exists without ``resume``, or its
                progress record is corrupt or was made for another request.
            DistributedKernelError: another rank failed, or the collectives did not
                complete (the process group's timeout).
        """
        options = self.options
        if self._sketch[0] is not None:
            return self._sketched(x1, x2)
        if not options.scale.plain:
            result = compute(options, self._memo, x1, x2)
            return self._assembled(result) if isinstance(result, dict) else result
        fmodel = functional_view(options)
        with torch.no_grad(), evaluation_context(options.model, fmodel.device):
            plan = plan_kernel(options, self._memo, fmodel, x1, x2)
            try:
                kernels = _compute(plan, self.mode, options.progress)
            except NonFiniteKernelError:
                raise
            except Exception:
                retry = replan_without_vmap(options, self._memo, fmodel, plan)
                if retry is None:
                    raise
                kernels = _compute(retry, self.mode, options.progress)
        return self._assembled(kernels)

    def _sketched(self, x1: Inputs, x2: Optional[Inputs]) -> torch.Tensor:
        """The sketched kernel (:mod:`.sketch`) of the parameters as they are now."""
        options = self.options
        fmodel = functional_view(options)
        budget = options.memory_budget if options.memory_budget is not None else default_memory_budget(fmodel.device)
        with torch.no_grad(), evaluation_context(options.model, fmodel.device):
            return sketched_kernel(fmodel, options.layout, x1, x2, *self._sketch, budget)

    def _assembled(self, kernels: Dict[str, torch.Tensor]) -> Union[torch.Tensor, PerLayerKernels]:
        """The total kernel, or the :class:`PerLayerKernels` of ``{group: kernel}``."""
        if not self.options.per_layer:
            return kernels[TOTAL]
        parts = iter(kernels.values())
        total = next(parts).clone()
        for part in parts:
            total += part
        return PerLayerKernels(kernels, total)

    def explain(self, x1: Inputs, x2: Optional[Inputs] = None) -> StructuredReport:
        """How ``self(x1, x2)`` would run, computing no kernel.

        Analyses the model (forward passes on one and two examples, and the dry runs on
        one example that decide which engines can run it) and reports, for each module
        whose parameters a rule covers, the rule and the strategy chosen for the planned
        block size with both strategies' estimated FLOPs (Novak et al. 2022), which
        parameters fall back to Jacobian contraction and why, the method the ``method``
        option resolves to, and what falls back and why (``vmap`` failing: the loop engine
        and the per-example capture; forward mode failing: reverse-over-reverse columns).
        The engine of that method is tried on ``x1``'s first example; a failure is
        reported, not raised. ``str(report)`` is a readable table.
        """
        options = self.options
        fmodel = functional_view(options)
        with torch.no_grad(), evaluation_context(options.model, fmodel.device):
            plan = plan_kernel(options, self._memo, fmodel, x1, x2, method=StructuredEngine.name)
            self._memo.analyse(fmodel, plan.x1, plan.n1, need_plan=True, checks=("vmap",))
            plan = plan_kernel(options, self._memo, fmodel, x1, x2, method=StructuredEngine.name)
            method, notes = _try_method(options, self._memo, fmodel, x1, x2)
            checks = self._memo.analyse(fmodel, plan.x1, plan.n1, need_plan=True).checks
        plan = dataclasses.replace(plan, analysis=dataclasses.replace(plan.analysis, checks=checks))
        return structured_report(plan, method, tuple(engine_notes(checks)) + notes)

    def __repr__(self) -> str:
        o = self.options
        return f"NTK({type(o.model).__name__}, mode={self.mode!r}, method={o.method!r}, per_layer={o.per_layer})"


def _compute(plan: KernelPlan, mode: str, progress: bool) -> Dict[str, torch.Tensor]:
    """Every group's kernel of ``plan`` (see :func:`.tiling.compute_kernel`)."""
    engine = plan.engine
    logger.debug(
        "NTK: method=%s mode=%s N1=%d N2=%d O=%d P=%d block=%d budget=%d",
        engine.name, mode, plan.n1, plan.n2, plan.analysis.num_outputs,
        plan.analysis.profile.num_params, plan.block_size, plan.budget,
    )
    try:
        return compute_kernel(engine, plan.x1, plan.x2, plan.n1, plan.n2, plan.block_size, plan.symmetric, progress)
    except NonFiniteBlock as failure:
        raise nonfinite_error(plan, failure) from None


def _try_method(
    options: KernelOptions, memo: AnalysisMemo, fmodel: FunctionalModel, x1: Inputs, x2: Optional[Inputs]
) -> Tuple[str, Tuple[str, ...]]:
    """The method ``options.method`` resolves to, and why it cannot run when it cannot:
    planned as a call would plan it (without the call's warning), and its engine run on
    ``x1``'s first example."""
    try:
        plan = plan_kernel(options, memo, fmodel, x1, x2, warn=False)
    except UnsupportedModelError as error:
        return options.method, (str(error),)
    try:
        plan.engine.prepare_rows(slice_inputs(plan.x1, 0, 1))
    except Exception as error:  # reported, not raised: explain computes no kernel
        return plan.engine.name, (f"a dry run of method={plan.engine.name!r} on x1's first example failed: {first_line(error)}",)
    return plan.engine.name, ()


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
    call_kwargs: Optional[Mapping[str, Any]] = None,
    distributed: bool = False,
    process_group: Any = None,
    gather: str = "all",
    out: Union[str, "os.PathLike[str]", None] = None,
    resume: bool = False,
    sketch: Optional[int] = None,
    sketch_seed: int = 0,
) -> KernelResult:
    r"""The empirical neural tangent kernel of ``model`` between ``x1`` and ``x2``.

    ``NTK(model, **options)(x1, x2)``: see :class:`NTK` for the formula, every option and
    the errors. To compute kernels of one model repeatedly (during training, say), build
    the :class:`NTK` once and call it: the options are then checked and the model analysed
    only once.

    Returns:
        ``(N1, N2, O, O)`` (``mode="full"``), ``(N1, N2)`` (``"trace"``, ``"pntk"``) or
        ``(N1, N2, O)`` (``"diagonal"``) on the model's device in the compute dtype, or a
        :class:`PerLayerKernels` when ``per_layer=True``; with ``distributed``, ``gather``
        or ``out`` as :meth:`NTK.__call__` says.
    """
    kernel = NTK(
        model, mode=mode, method=method, params=params, output_fn=output_fn, per_layer=per_layer,
        dtype=dtype, memory_budget=memory_budget, batch_size=batch_size, progress=progress,
        call_kwargs=call_kwargs,
        distributed=distributed, process_group=process_group, gather=gather, out=out, resume=resume,
        sketch=sketch, sketch_seed=sketch_seed,
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
    call_kwargs: Optional[Mapping[str, Any]] = None,
) -> StructuredReport:
    """How the structured engine would compute ``empirical_ntk(model, x1, x2, ...)``:
    ``NTK(model, **options).explain(x1, x2)`` (see :meth:`NTK.explain`)."""
    kernel = NTK(
        model, mode=mode, method=method, params=params, output_fn=output_fn, per_layer=per_layer,
        dtype=dtype, memory_budget=memory_budget, batch_size=batch_size, progress=progress,
        call_kwargs=call_kwargs,
    )
    return kernel.explain(x1, x2)
