"""``empirical_ntk``: argument checks, engine choice, tiling and result assembly."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..errors import NonFiniteKernelError
from ..functional import (
    FunctionalModel,
    Inputs,
    ParamGroup,
    ParamSelector,
    batch_size as _batch_size,
    check_compatible,
    evaluation_context,
    slice_inputs,
)
from . import analysis_cache
from .cost import (
    ForwardProfile,
    default_memory_budget,
    jacobian_cost,
    ntk_vp_cost,
    parse_memory,
    profile_forward,
)
from .engine import MODES, Engine
from .jacobian import JacobianEngine
from .ntk_vp import NTKVPEngine
from .structured import StructuredEngine, StructuredPlan, analyse, structured_cost
from .tiling import NonFiniteBlock, compute_kernel, plan_block_size

logger = logging.getLogger("ntk_torch.kernel")

ENGINES: Dict[str, Type[Engine]] = {
    JacobianEngine.name: JacobianEngine,
    NTKVPEngine.name: NTKVPEngine,
    StructuredEngine.name: StructuredEngine,
}
METHODS = ("auto",) + tuple(ENGINES)
TOTAL = "total"


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
    memory_budget: Optional[Union[int, float, str]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> Union[torch.Tensor, PerLayerKernels]:
    r"""The empirical neural tangent kernel of ``model`` between ``x1`` and ``x2``.

    .. math::
        \Theta(x, x')_{ab} = \sum_p \frac{\partial f_a(x)}{\partial\theta_p}
                                    \frac{\partial f_b(x')}{\partial\theta_p}

    (Jacot et al. 2018), over the trainable parameters ``theta`` of ``model`` (each tied
    tensor once), with the model evaluated as in eval mode. The module's mode, the RNG
    states and every ``.grad`` are left as they were, also when an error is raised.

    Args:
        model: any ``nn.Module``; called through ``torch.func.functional_call`` with its
            parameters and buffers.
        x1: a Tensor, tuple of Tensors (``model(*x1)``) or dict of Tensors
            (``model(**x1)``), batched on dim 0: ``N1`` examples.
        x2: the same structure and feature shapes as ``x1`` with ``N2`` examples, or
            ``None`` for ``x2 = x1``, computed once per block pair and exactly symmetric.
        mode: ``"full"`` -> ``(N1, N2, O, O)``; ``"trace"`` -> ``(N1, N2)``, the sum over
            ``o`` of ``K[i, j, o, o]``; ``"diagonal"`` -> ``(N1, N2, O)``. ``O`` is the
            number of output values per example (``prod(out)`` for outputs ``(N, *out)``).
            ``trace`` and ``diagonal`` never build the full kernel.
        method: ``"jacobian"`` (Jacobian contraction), ``"ntk_vp"`` (NTK-vector
            products), ``"structured"`` (per-module rules for Linear, Conv, Embedding and
            norm layers, Jacobian contraction for other parameters; see
            :func:`ntk_torch.kernel.explain`) or ``"auto"``, which picks the cheapest by
            the cost model of Novak et al. 2022 on FLOPs measured for one forward pass.
        params: narrow the parameters: glob pattern(s) on parameter names or module paths
            (``"layers.0.*"``, ``"*.bias"``), module(s), or a list mixing both.
        output_fn: maps the model's output to a ``(N, *out)`` Tensor (for models returning
            tuples, dicts or objects).
        per_layer: return a :class:`PerLayerKernels` mapping each parameter group (the
            path of the module owning the parameters) to its kernel, with ``.total``.
        batch_size: the largest block of examples per side.
        memory_budget: peak extra bytes for one block (int or a string like ``"2GB"``);
            default a quarter of free host memory (half of free CUDA memory).
        dtype: compute dtype (e.g. ``torch.float64``); the model itself is not touched.
        progress: show a tqdm progress bar over blocks.

    Returns:
        The kernel on the model's device in the compute dtype, or a
        :class:`PerLayerKernels` when ``per_layer=True``.

    Raises:
        ValueError / TypeError: naming the argument at fault.
        NonFiniteKernelError: the kernel has NaN/inf entries; names the parameter groups.
    """
    request = prepare_request(
        model, x1, x2, mode, method, params, output_fn, per_layer, batch_size, memory_budget, dtype, progress
    )
    fmodel, x1, x2, n1, n2 = request.fmodel, request.x1, request.x2, request.n1, request.n2
    symmetric, budget = request.symmetric, request.budget

    with torch.no_grad(), evaluation_context(model, fmodel.device):
        need_plan = method in ("auto", StructuredEngine.name)
        num_outputs, profile, plan = measure(fmodel, x1, n1, need_plan)
        groups = fmodel.groups if per_layer else [ParamGroup(TOTAL, tuple(fmodel.params))]
        engine = _make_engine(method, fmodel, mode, groups, profile, budget, n1, n2, symmetric, plan)
        block = plan_block_size(engine, n1, n2, budget, batch_size)
        logger.debug(
            "empirical_ntk: method=%s mode=%s N1=%d N2=%d O=%d P=%d block=%d budget=%d",
            engine.name, mode, n1, n2, num_outputs, profile.num_params, block, budget,
        )
        try:
            kernels = compute_kernel(engine, x1, x2, n1, n2, block, symmetric, progress)
        except NonFiniteBlock as failure:
            raise NonFiniteKernelError(_nonfinite_groups(engine, failure, x1, x2)) from None

    if not per_layer:
        return kernels[TOTAL]
    parts = iter(kernels.values())
    total = next(parts).clone()
    for part in parts:
        total += part
    return PerLayerKernels(kernels, total)


@dataclass(frozen=True)
class KernelRequest:
    """The checked arguments of one kernel computation.

    Attributes:
        fmodel: the functional view of the model.
        x1, x2: the inputs on the model's device in the compute dtype (``x2 is x1`` when
            symmetric).
        n1, n2: the batch sizes.
        symmetric: ``x2=None`` was given.
        budget: the memory budget in bytes (the default filled in).
    """

    fmodel: FunctionalModel
    x1: Inputs
    x2: Inputs
    n1: int
    n2: int
    symmetric: bool
    budget: int


def prepare_request(
    model, x1, x2, mode, method, params, output_fn, per_layer, batch_size, memory_budget, dtype, progress
) -> KernelRequest:
    """Check every argument of ``empirical_ntk`` (and ``explain``) and prepare the inputs."""
    _check_options(mode, method, per_layer, batch_size, progress)
    budget_bytes = None if memory_budget is None else parse_memory(memory_budget)
    fmodel = FunctionalModel(model, params=params, output_fn=output_fn, dtype=dtype)
    n1 = _batch_size(x1, "x1")
    symmetric = x2 is None
    if not symmetric:
        check_compatible(x1, x2)
    n2 = n1 if symmetric else _batch_size(x2, "x2")
    x1 = fmodel.prepare_inputs(x1)
    x2 = x1 if symmetric else fmodel.prepare_inputs(x2)
    budget = budget_bytes if budget_bytes is not None else default_memory_budget(fmodel.device)
    return KernelRequest(fmodel, x1, x2, n1, n2, symmetric, budget)


def method_costs(
    profile: ForwardProfile,
    mode: str,
    n1: int,
    n2: int,
    symmetric: bool,
    plan: Optional[StructuredPlan] = None,
    fmodel: Optional[FunctionalModel] = None,
) -> Dict[str, float]:
    """Estimated FLOPs of each engine; the structured engine is a candidate when a
    ``plan`` (with its ``fmodel``) is given and its rules cover at least one parameter."""
    costs = {
        JacobianEngine.name: jacobian_cost(profile, mode, n1, n2, symmetric),
        NTKVPEngine.name: ntk_vp_cost(profile, mode, n1, n2, symmetric),
    }
    if plan is not None and fmodel is not None and plan.bundles:
        costs[StructuredEngine.name] = structured_cost(
            plan, profile, mode, n1, n2, symmetric, plan.term_shapes(fmodel)
        )
    return costs


def choose_method(
    profile: ForwardProfile,
    mode: str,
    n1: int,
    n2: int,
    symmetric: bool,
    plan: Optional[StructuredPlan] = None,
    fmodel: Optional[FunctionalModel] = None,
) -> str:
    """The method ``"auto"`` picks: the engine with the lowest estimated FLOPs
    (:func:`method_costs`)."""
    costs = method_costs(profile, mode, n1, n2, symmetric, plan, fmodel)
    return min(costs, key=costs.get)


def measure(
    fmodel: FunctionalModel, x1: Inputs, n1: int, need_plan: bool
) -> Tuple[int, ForwardProfile, Optional[StructuredPlan]]:
    """``O``, the forward profile and (when ``need_plan``) the structured engine's coverage
    analysis, from the first examples of ``x1``; reused from :mod:`.analysis_cache` while
    the model's structure, its tensors and the inputs' feature shapes are unchanged."""
    key = analysis_cache.signature(fmodel, x1, n1)
    entry = analysis_cache.lookup(fmodel.model, key)
    if entry is None:
        num_outputs = fmodel.output_size(slice_inputs(x1, 0, min(n1, 2)), min(n1, 2))
        profile = profile_forward(fmodel, slice_inputs(x1, 0, 1), num_outputs)
        entry = {"num_outputs": num_outputs, "profile": profile}
        analysis_cache.store(fmodel.model, key, entry)
    if not need_plan:
        return entry["num_outputs"], entry["profile"], None
    if "plan" not in entry:
        plan = analyse(fmodel, x1, entry["num_outputs"])
        entry["plan"] = analysis_cache.detach_plan(plan)
        return entry["num_outputs"], entry["profile"], plan
    return entry["num_outputs"], entry["profile"], analysis_cache.bind_plan(entry["plan"], fmodel.model)


def _make_engine(
    method: str,
    fmodel: FunctionalModel,
    mode: str,
    groups: Sequence[ParamGroup],
    profile: ForwardProfile,
    budget: int,
    n1: int,
    n2: int,
    symmetric: bool,
    plan: Optional[StructuredPlan],
) -> Engine:
    if method == "auto":
        method = choose_method(profile, mode, n1, n2, symmetric, plan, fmodel)
    if method == StructuredEngine.name:
        return StructuredEngine(fmodel, mode, groups, profile, budget, plan=plan)
    return ENGINES[method](fmodel, mode, groups, profile, budget)


def _check_options(mode, method, per_layer, batch_size, progress) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size}")


def _nonfinite_groups(
    engine: Engine, failure: NonFiniteBlock, x1: Inputs, x2: Inputs
) -> Sequence[str]:
    """The parameter groups whose contribution to the failing block is not finite.

    Diagnosed per group with reverse mode (Jacobian contraction) whatever the engine:
    forward mode turns zero tangents through infinite weights into NaN, which would
    blame groups whose own contribution is finite.
    """
    real_groups = engine.fmodel.groups
    if isinstance(engine, JacobianEngine) and failure.groups != [TOTAL]:
        return failure.groups
    diagnosis = JacobianEngine(
        engine.fmodel, engine.mode, real_groups, engine.profile, engine.memory_budget
    )
    rows = diagnosis.prepare_rows(slice_inputs(x1, *failure.rows))
    cols = diagnosis.prepare_cols(slice_inputs(x2, *failure.cols))
    blocks = diagnosis.contract(rows, cols)
    bad = [name for name, block in blocks.items() if not torch.isfinite(block).all()]
    return bad or [TOTAL]
