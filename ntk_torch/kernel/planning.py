"""How one kernel computation will run: the engine, its block size and why.

:func:`plan_kernel` turns checked :class:`KernelOptions` and inputs into a
:class:`KernelPlan`: the functional view of the model, the prepared inputs, the measured
:class:`~.analysis.Analysis`, the engine the method resolves to and the block size under
the memory budget. :class:`~.api.NTK` computes such a plan; its ``explain`` reports one.

Which engines can run the model is decided by the dry runs of :mod:`.capability`, once
per model and input shape (the analysis memo keeps them):

* ``"loop"`` needs plain autograd only; ``"jacobian"`` and ``"ntk_vp"`` need ``vmap`` and
  raise :class:`~ntk_torch.errors.UnsupportedModelError` (naming the layer, the
  operation and ``method="loop"``) where it fails; ``"structured"`` captures one example
  at a time with plain autograd there. The dry runs that run before the first block are
  :data:`UP_FRONT_CHECKS`.
* ``"ntk_vp"`` uses reverse-over-reverse columns where forward mode fails or disagrees.
* ``"auto"`` picks the lowest estimated FLOPs (:func:`method_costs`) among the engines
  that can run the model: without ``vmap``, the loop engine and the per-example
  structured capture, with one warning naming the reason (:data:`FALLBACK_WARNING`).
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..functional import (
    FunctionalModel, Inputs, ParamGroup, ParamSelector, batch_size, check_compatible, check_no_overlap,
)
from ..layout import Layout
from .analysis import Analysis, AnalysisMemo
from .cost import ForwardProfile, default_memory_budget, jacobian_cost, loop_cost, ntk_vp_cost
from .engine import Engine
from .jacobian import JacobianEngine
from .loop import LoopEngine
from .ntk_vp import NTKVPEngine
from .structured import StructuredEngine, StructuredPlan, structured_cost
from .tiling import plan_block_size

ENGINES: Dict[str, Type[Engine]] = {
    JacobianEngine.name: JacobianEngine,
    NTKVPEngine.name: NTKVPEngine,
    StructuredEngine.name: StructuredEngine,
    LoopEngine.name: LoopEngine,
}
UP_FRONT_CHECKS = {"auto": ("vmap",), NTKVPEngine.name: ("vmap",), LoopEngine.name: ("autograd",)}
"""The dry runs a method needs before its first block. The Jacobian and structured engines
run without one: ``vmap`` is checked only if their first block fails
(:func:`replan_without_vmap`)."""
FALLBACK_WARNING = "method='auto': torch.func.vmap cannot run this model"
"""The start of the one warning ``auto`` gives when it falls back to the engines without
``vmap``; the reason follows."""
METHODS = ("auto",) + tuple(ENGINES)
TOTAL = "total"
"""The name of the one parameter group of a kernel computed without ``per_layer``."""


GATHERS = ("all", "rank0", "none")
"""Who receives a distributed kernel: every rank, rank 0, or nobody (each keeps its tiles)."""


@dataclass(frozen=True)
class ScaleOptions:
    """Where a computation's tiles run and where the kernel goes (checked by
    :func:`~.execution.scale_options`; see :class:`~.api.NTK`)."""

    distributed: bool = False
    process_group: Any = None
    gather: str = "all"
    out: Optional[Path] = None
    resume: bool = False

    @property
    def plain(self) -> bool:
        """One process and the whole kernel in memory: the tiling's own loop."""
        return not self.distributed and self.process_group is None and self.out is None and self.gather == GATHERS[0]


@dataclass(frozen=True)
class KernelOptions:
    """The checked configuration of an :class:`~.api.NTK` (see there)."""

    model: nn.Module
    layout: Layout
    method: str
    params: ParamSelector
    output_fn: Optional[Callable[[Any], torch.Tensor]]
    per_layer: bool
    dtype: Optional[torch.dtype]
    memory_budget: Optional[int]
    batch_size: Optional[int]
    progress: bool
    call_kwargs: Mapping[str, Any]
    scale: ScaleOptions = ScaleOptions()


@dataclass(frozen=True)
class KernelPlan:
    """One kernel computation, ready to run.

    Attributes:
        fmodel: the functional view of the model (its parameters as they are now).
        x1, x2: the inputs on the model's device in the compute dtype (``x2 is x1`` when
            symmetric).
        n1, n2: the batch sizes.
        symmetric: ``x2=None`` was given.
        budget: the memory budget in bytes (the default filled in).
        analysis: ``O``, the forward profile and the structured coverage.
        groups: the parameter groups computed separately.
        engine: the engine that will compute the blocks.
        block_size: examples per block side.
    """

    fmodel: FunctionalModel
    x1: Inputs
    x2: Inputs
    n1: int
    n2: int
    symmetric: bool
    budget: int
    analysis: Analysis
    groups: Sequence[ParamGroup]
    engine: Engine
    block_size: int

    def costs(self) -> Dict[str, float]:
        """Estimated FLOPs of each candidate engine on the whole kernel (only the engines
        that can run the model)."""
        return method_costs(
            self.analysis.profile, self.engine.layout, self.n1, self.n2, self.symmetric,
            self.analysis.plan, self.fmodel, self.analysis.checks,
        )


def _checked_inputs(fmodel: FunctionalModel, x1: Inputs, x2: Optional[Inputs]):
    """``(x1, x2, n1, n2, symmetric)``: the inputs checked against each other and moved to
    the model's device in the compute dtype."""
    n1 = batch_size(x1, "x1")
    check_no_overlap(x1, fmodel.call_kwargs, "x1")
    symmetric = x2 is None
    if not symmetric:
        check_compatible(x1, x2)
    n2 = n1 if symmetric else batch_size(x2, "x2")
    x1 = fmodel.prepare_inputs(x1)
    x2 = x1 if symmetric else fmodel.prepare_inputs(x2)
    return x1, x2, n1, n2, symmetric


def functional_view(options: KernelOptions) -> FunctionalModel:
    """The model as a function of its selected parameters, as they are now."""
    return FunctionalModel(
        options.model, params=options.params, output_fn=options.output_fn, dtype=options.dtype,
        call_kwargs=options.call_kwargs,
    )


def plan_kernel(
    options: KernelOptions,
    memo: AnalysisMemo,
    fmodel: FunctionalModel,
    x1: Inputs,
    x2: Optional[Inputs],
    method: Optional[str] = None,
    warn: bool = True,
) -> KernelPlan:
    """The plan of the kernel between ``x1`` and ``x2`` for ``fmodel`` (the options'
    :func:`functional_view`) with ``method`` (default the options' own); ``warn=False``
    keeps ``auto``'s fallback warning for a later call. The caller provides eval mode, a
    forked RNG and ``torch.no_grad`` (the analysis runs forward passes).

    Raises:
        UnsupportedModelError: ``method`` cannot run this model (see the module docstring).
    """
    method = options.method if method is None else method
    x1, x2, n1, n2, symmetric = _checked_inputs(fmodel, x1, x2)
    budget = options.memory_budget if options.memory_budget is not None else default_memory_budget(fmodel.device)
    analysis = memo.analyse(
        fmodel, x1, n1, need_plan=method in ("auto", StructuredEngine.name), checks=UP_FRONT_CHECKS.get(method, ())
    )
    if method == "auto":
        method, analysis = _resolve_auto(memo, fmodel, x1, n1, options.layout, n2, symmetric, analysis, warn)
    elif method == NTKVPEngine.name:
        analysis = _ntk_vp_checks(memo, fmodel, x1, n1, analysis)
    _refuse_unsupported(method, analysis)
    groups = fmodel.groups if options.per_layer else [ParamGroup(TOTAL, tuple(fmodel.params))]
    engine = make_engine(method, fmodel, options.layout, groups, analysis, budget)
    block = plan_block_size(engine, n1, n2, budget, options.batch_size)
    return KernelPlan(fmodel, x1, x2, n1, n2, symmetric, budget, analysis, groups, engine, block)


def replan_without_vmap(
    options: KernelOptions, memo: AnalysisMemo, fmodel: FunctionalModel, plan: KernelPlan
) -> Optional[KernelPlan]:
    """After the engine of ``plan`` raised: when ``vmap`` was not checked yet and its dry
    run now fails, the plan again with what that implies (the structured engine's
    per-example capture; for the Jacobian engine :class:`UnsupportedModelError`); None
    when the failure is not ``vmap``'s (the caller raises the engine's error)."""
    if "vmap" in plan.analysis.checks or plan.engine.name not in (JacobianEngine.name, StructuredEngine.name):
        return None
    analysis = memo.analyse(fmodel, plan.x1, plan.n1, need_plan=plan.analysis.plan is not None, checks=("vmap",))
    if analysis.fails("vmap") is None:
        return None
    return plan_kernel(options, memo, fmodel, plan.x1, None if plan.symmetric else plan.x2, method=plan.engine.name)


def _ntk_vp_checks(memo: AnalysisMemo, fmodel: FunctionalModel, x1: Inputs, n1: int, analysis: Analysis) -> Analysis:
    """The analysis with the forward-mode check and, where it fails, the check of the
    reverse-over-reverse columns (only when ``vmap`` runs the model)."""
    if analysis.fails("vmap"):
        return analysis
    analysis = memo.analyse(fmodel, x1, n1, need_plan=analysis.plan is not None, checks=("forward_mode",))
    if analysis.fails("forward_mode"):
        analysis = memo.analyse(fmodel, x1, n1, need_plan=analysis.plan is not None, checks=("reverse_products",))
    return analysis


def _resolve_auto(
    memo: AnalysisMemo, fmodel: FunctionalModel, x1: Inputs, n1: int, layout: Layout, n2: int, symmetric: bool,
    analysis: Analysis,
    warn: bool,
) -> Tuple[str, Analysis]:
    """The method ``auto`` runs, and the analysis with the checks that choice needed: the
    cheapest engine that can run the model, with one warning per memo when ``vmap``
    cannot."""
    reason = analysis.fails("vmap")
    if reason is not None and warn and memo.first_warning(reason):
        warnings.warn(
            f"{FALLBACK_WARNING} ({reason}); computing the kernel with plain autograd, one "
            "example at a time (the loop engine or the structured engine's per-example capture)",
            RuntimeWarning,
            stacklevel=4,
        )
    method = choose_method(analysis.profile, layout, n1, n2, symmetric, analysis.plan, fmodel, analysis.checks)
    if method == NTKVPEngine.name:  # forward mode is checked only when it would be used
        analysis = _ntk_vp_checks(memo, fmodel, x1, n1, analysis)
        method = choose_method(analysis.profile, layout, n1, n2, symmetric, analysis.plan, fmodel, analysis.checks)
    return method, analysis


def _refuse_unsupported(method: str, analysis: Analysis) -> None:
    """Raise :class:`UnsupportedModelError` when ``method`` cannot run the model."""
    vmap_failure = analysis.fails("vmap")
    if method in (JacobianEngine.name, NTKVPEngine.name) and vmap_failure is not None:
        raise UnsupportedModelError(
            f"method={method!r} cannot run this model: torch.func.vmap fails in {vmap_failure.rstrip('.')}; "
            "use method='loop' (plain autograd, one example at a time) or method='auto', "
            "which falls back to it"
        )
    if method == NTKVPEngine.name and analysis.fails("reverse_products") is not None:
        raise UnsupportedModelError(
            f"method='ntk_vp' cannot run this model: forward mode fails ({analysis.fails('forward_mode')}) "
            f"and so do reverse-over-reverse products ({analysis.fails('reverse_products')}). "
            "Use method='jacobian', 'structured' or 'loop'"
        )


def make_engine(
    method: str,
    fmodel: FunctionalModel,
    layout: Layout,
    groups: Sequence[ParamGroup],
    analysis: Analysis,
    budget: int,
) -> Engine:
    """The engine called ``method`` (not ``"auto"``) for these groups, built for what the
    analysis's checks found (per-example capture without ``vmap``, reverse-over-reverse
    columns without forward mode)."""
    if method == StructuredEngine.name:
        return StructuredEngine(
            fmodel, layout, groups, analysis.profile, budget, plan=analysis.plan,
            per_example=analysis.fails("vmap") is not None,
        )
    if method == NTKVPEngine.name:
        return NTKVPEngine(
            fmodel, layout, groups, analysis.profile, budget,
            reverse_products=analysis.fails("forward_mode") is not None,
        )
    return ENGINES[method](fmodel, layout, groups, analysis.profile, budget)


def method_costs(
    profile: ForwardProfile,
    layout: Layout,
    n1: int,
    n2: int,
    symmetric: bool,
    plan: Optional[StructuredPlan] = None,
    fmodel: Optional[FunctionalModel] = None,
    checks: Optional[Mapping[str, Optional[str]]] = None,
) -> Dict[str, float]:
    """Estimated FLOPs of each engine that can run the model by the ``checks`` found so
    far (:attr:`.analysis.Analysis.checks`): with ``vmap``, the Jacobian and NTK-vector
    product engines (the latter with reverse-over-reverse columns where forward mode
    failed); without it, the loop engine. The structured engine is a candidate when a
    ``plan`` (with its ``fmodel``) is given and its rules cover at least one parameter."""
    checks = checks or {}
    if checks.get("vmap") is None:
        costs = {
            JacobianEngine.name: jacobian_cost(profile, layout, n1, n2, symmetric),
            NTKVPEngine.name: ntk_vp_cost(profile, layout, n1, n2, symmetric, checks.get("forward_mode") is not None),
        }
        if checks.get("reverse_products") is not None:
            del costs[NTKVPEngine.name]
    else:
        costs = {LoopEngine.name: loop_cost(profile, layout, n1, n2, symmetric)}
    if plan is not None and fmodel is not None and plan.bundles:
        costs[StructuredEngine.name] = structured_cost(
            plan, profile, layout, n1, n2, symmetric, plan.term_shapes(fmodel)
        )
    return costs


def choose_method(
    profile: ForwardProfile,
    layout: Layout,
    n1: int,
    n2: int,
    symmetric: bool,
    plan: Optional[StructuredPlan] = None,
    fmodel: Optional[FunctionalModel] = None,
    checks: Optional[Mapping[str, Optional[str]]] = None,
) -> str:
    """The method ``"auto"`` picks: the engine with the lowest estimated FLOPs among those
    that can run the model (:func:`method_costs`)."""
    costs = method_costs(profile, layout, n1, n2, symmetric, plan, fmodel, checks)
    return min(costs, key=costs.get)
