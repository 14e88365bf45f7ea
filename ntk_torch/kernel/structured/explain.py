"""``explain``: what ``empirical_ntk`` would do with the structured engine, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ...functional import Inputs, ParamGroup, ParamSelector, evaluation_context
from ..api import TOTAL, measure, method_costs, prepare_request
from ..tiling import plan_block_size
from .engine import StructuredEngine
from .terms import strategy_flops


@dataclass(frozen=True)
class TermReport:
    """One term of the structured engine: a covered module's parameters or a fallback one."""

    modules: str  # module path(s); "" for a fallback parameter
    module_types: Tuple[str, ...]
    rule: str  # rule name, or "fallback (jacobian)"
    params: Tuple[str, ...]
    group: str
    strategy: str  # "gram" or "grads" at the planned block size
    flops: Dict[str, float]  # per strategy, one block pair
    reason: str = ""  # why a fallback parameter is not covered


@dataclass(frozen=True)
class StructuredReport:
    """The structured engine's plan for a kernel computation.

    Attributes:
        terms: one :class:`TermReport` per covered bundle, then one per fallback parameter.
        fallback: ``{parameter name: reason}`` for the parameters no rule covers.
        method: the method ``empirical_ntk`` would run with the given ``method`` option.
        costs: estimated FLOPs of each method on the whole kernel.
        block_size: the structured engine's block size under the memory budget.
        mode, n1, n2: the kernel computation explained.
    """

    terms: Tuple[TermReport, ...]
    fallback: Dict[str, str]
    method: str
    costs: Dict[str, float]
    block_size: int
    mode: str
    n1: int
    n2: int

    @property
    def covered(self) -> List[str]:
        """Parameter names computed by rules."""
        return [p for t in self.terms if not t.rule.startswith("fallback") for p in t.params]

    def __str__(self) -> str:
        costs = ", ".join(f"{m} {c:.3g}" for m, c in sorted(self.costs.items(), key=lambda kv: kv[1]))
        lines = [
            f"eNTK {self.mode} {self.n1}x{self.n2}: method={self.method} "
            f"(estimated FLOPs: {costs}); structured blocks of {self.block_size}",
        ]
        header = ("module", "rule", "strategy", "gram FLOPs", "grads FLOPs", "parameters")
        rows = [header]
        for t in self.terms:
            rows.append((
                t.modules or "-",
                t.rule,
                t.strategy,
                f"{t.flops['gram']:.3g}" if "gram" in t.flops else "-",
                f"{t.flops['grads']:.3g}",
                ", ".join(t.params) + (f"  [{t.reason}]" if t.reason else ""),
            ))
        widths = [max(len(r[k]) for r in rows) for k in range(len(header) - 1)]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if self.fallback:
            lines.append(f"{len(self.fallback)} parameter(s) fall back to Jacobian contraction.")
        else:
            lines.append("Every parameter is covered by a rule.")
        return "\n".join(lines)


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
    memory_budget: Optional[Union[int, float, str]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> StructuredReport:
    """How the structured engine would compute ``empirical_ntk(model, x1, x2, ...)``.

    Takes the same arguments as :func:`ntk_torch.empirical_ntk` and computes no kernel:
    it analyses the model (one forward pass on one and on two examples), and reports for
    each module whose parameters a rule covers the rule, the strategy chosen for the
    planned block size (``"gram"``: feature Gram times cotangent Gram; ``"grads"``:
    per-example weight gradients then their Gram) with both strategies' estimated FLOPs
    (Novak et al. 2022), which parameters fall back to Jacobian contraction and why, and
    the method ``method`` resolves to. ``str(report)`` is a readable table.
    """
    request = prepare_request(
        model, x1, x2, mode, method, params, output_fn, per_layer, batch_size, memory_budget, dtype, progress
    )
    fmodel, n1, n2, symmetric, budget = request.fmodel, request.n1, request.n2, request.symmetric, request.budget

    with torch.no_grad(), evaluation_context(model, fmodel.device):
        num_outputs, profile, plan = measure(fmodel, request.x1, n1, need_plan=True)
        costs = method_costs(profile, mode, n1, n2, symmetric, plan, fmodel)
        chosen = min(costs, key=costs.get) if method == "auto" else method
        groups = fmodel.groups if per_layer else [ParamGroup(TOTAL, tuple(fmodel.params))]
        engine = StructuredEngine(fmodel, mode, groups, profile, budget, plan=plan)
        block = plan_block_size(engine, n1, n2, budget, batch_size)

    b1, b2 = min(block, n1), min(block, n2)
    strategies = engine.strategies(b1, b2, symmetric and b1 == n1)
    terms = []
    labels = engine.term_labels()
    kinds = [(b.rule, b.module_types) for b in plan.bundles] + [
        ("fallback (jacobian)", ()) for _ in plan.fallback
    ]
    for shape, (label, names), (rule, types), strategy, group in zip(
        engine.term_shapes, labels, kinds, strategies, engine.term_groups
    ):
        flops = strategy_flops(shape, mode, num_outputs, b1, b2, symmetric and b1 == n1)
        is_fallback = rule.startswith("fallback")
        terms.append(TermReport(
            modules="" if is_fallback else label,
            module_types=types,
            rule=rule,
            params=names,
            group=groups[group].name,
            strategy=strategy,
            flops=flops,
            reason=plan.fallback.get(names[0], "") if is_fallback else "",
        ))
    return StructuredReport(tuple(terms), dict(plan.fallback), chosen, costs, block, mode, n1, n2)
