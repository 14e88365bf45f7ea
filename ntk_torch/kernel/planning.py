"""How one kernel computation will run: the engine, its block size and why.

:func:`plan_kernel` turns checked :class:`KernelOptions` and inputs into a
:class:`KernelPlan`: the functional view of the model, the prepared inputs, the measured
:class:`~.analysis.Analysis`, the engine the method resolves to (``"auto"`` picks the
lowest estimated FLOPs, :func:`method_costs`) and the block size under the memory budget.
:class:`~.api.NTK` computes such a plan; its ``explain`` reports one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Type

import torch
from torch import nn

from ..functional import FunctionalModel, Inputs, ParamGroup, ParamSelector, batch_size, check_compatible
from ..layout import Layout
from .analysis import Analysis, AnalysisMemo
from .cost import ForwardProfile, default_memory_budget, jacobian_cost, ntk_vp_cost
from .engine import Engine
from .jacobian import JacobianEngine
from .ntk_vp import NTKVPEngine
from .structured import StructuredEngine, StructuredPlan, structured_cost
from .tiling import plan_block_size

ENGINES: Dict[str, Type[Engine]] = {
    JacobianEngine.name: JacobianEngine,
    NTKVPEngine.name: NTKVPEngine,
    StructuredEngine.name: StructuredEngine,
}
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
        """Estimated FLOPs of each candidate engine on the whole kernel."""
        return method_costs(
            self.analysis.profile, self.engine.layout, self.n1, self.n2, self.symmetric,
            self.analysis.plan, self.fmodel,
        )


def _checked_inputs(fmodel: FunctionalModel, x1: Inputs, x2: Optional[Inputs]):
    """``(x1, x2, n1, n2, symmetric)``: the inputs checked against each other and moved to
    the model's device in the compute dtype."""
    n1 = batch_size(x1, "x1")
    symmetric = x2 is None
    if not symmetric:
        check_compatible(x1, x2)
    n2 = n1 if symmetric else batch_size(x2, "x2")
    x1 = fmodel.prepare_inputs(x1)
    x2 = x1 if symmetric else fmodel.prepare_inputs(x2)
    return x1, x2, n1, n2, symmetric


def functional_view(options: KernelOptions) -> FunctionalModel:
    """The model as a function of its selected parameters, as they are now."""
    return FunctionalModel(options.model, params=options.params, output_fn=options.output_fn, dtype=options.dtype)


def plan_kernel(
    options: KernelOptions,
    memo: AnalysisMemo,
    fmodel: FunctionalModel,
    x1: Inputs,
    x2: Optional[Inputs],
    method: Optional[str] = None,
) -> KernelPlan:
    """The plan of the kernel between ``x1`` and ``x2`` for ``fmodel`` (the options'
    :func:`functional_view`) with ``method`` (default the options' own). The caller
    provides eval mode and ``torch.no_grad`` (the analysis runs forward passes)."""
    method = options.method if method is None else method
    x1, x2, n1, n2, symmetric = _checked_inputs(fmodel, x1, x2)
    budget = options.memory_budget if options.memory_budget is not None else default_memory_budget(fmodel.device)
    analysis = memo.analyse(fmodel, x1, n1, need_plan=method in ("auto", StructuredEngine.name))
    if method == "auto":
        method = choose_method(analysis.profile, options.layout, n1, n2, symmetric, analysis.plan, fmodel)
    groups = fmodel.groups if options.per_layer else [ParamGroup(TOTAL, tuple(fmodel.params))]
    engine = make_engine(method, fmodel, options.layout, groups, analysis, budget)
    block = plan_block_size(engine, n1, n2, budget, options.batch_size)
    return KernelPlan(fmodel, x1, x2, n1, n2, symmetric, budget, analysis, groups, engine, block)


def make_engine(
    method: str,
    fmodel: FunctionalModel,
    layout: Layout,
    groups: Sequence[ParamGroup],
    analysis: Analysis,
    budget: int,
) -> Engine:
    """The engine called ``method`` (not ``"auto"``) for these groups."""
    if method == StructuredEngine.name:
        return StructuredEngine(fmodel, layout, groups, analysis.profile, budget, plan=analysis.plan)
    return ENGINES[method](fmodel, layout, groups, analysis.profile, budget)


def method_costs(
    profile: ForwardProfile,
    layout: Layout,
    n1: int,
    n2: int,
    symmetric: bool,
    plan: Optional[StructuredPlan] = None,
    fmodel: Optional[FunctionalModel] = None,
) -> Dict[str, float]:
    """Estimated FLOPs of each engine; the structured engine is a candidate when a
    ``plan`` (with its ``fmodel``) is given and its rules cover at least one parameter."""
    costs = {
        JacobianEngine.name: jacobian_cost(profile, layout, n1, n2, symmetric),
        NTKVPEngine.name: ntk_vp_cost(profile, layout, n1, n2, symmetric),
    }
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
) -> str:
    """The method ``"auto"`` picks: the engine with the lowest estimated FLOPs
    (:func:`method_costs`)."""
    costs = method_costs(profile, layout, n1, n2, symmetric, plan, fmodel)
    return min(costs, key=costs.get)
