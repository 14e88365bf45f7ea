"""What a kernel computation would do with the structured engine, and why: :class:`StructuredReport`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from .planning import KernelPlan
from .structured import StructuredEngine
from .structured.terms import strategy_flops


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
        notes: what falls back and why: ``vmap`` failing (the loop engine or the
            per-example capture), forward mode failing (reverse-over-reverse columns), a
            method that cannot run the model, a failed dry run.
    """

    terms: Tuple[TermReport, ...]
    fallback: Dict[str, str]
    method: str
    costs: Dict[str, float]
    block_size: int
    mode: str
    n1: int
    n2: int
    notes: Tuple[str, ...] = ()

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
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)


def engine_notes(checks: Mapping[str, Optional[str]]) -> List[str]:
    """What the failed :mod:`.capability` checks make the engines do, one line each."""
    notes = []
    if checks.get("vmap") is not None:
        notes.append(
            f"torch.func.vmap cannot run this model ({checks['vmap']}): the structured engine "
            "captures one example at a time with plain autograd, method='auto' chooses between "
            "it and the loop engine, and 'jacobian' and 'ntk_vp' are refused"
        )
    if checks.get("forward_mode") is not None:
        notes.append(
            f"forward mode is not usable ({checks['forward_mode']}): method='ntk_vp' computes "
            "its columns by reverse-over-reverse products"
        )
    return notes


def structured_report(plan: KernelPlan, method: str, notes: Tuple[str, ...] = ()) -> StructuredReport:
    """The report of a plan computed with the structured engine; ``method`` is what the
    caller's method option resolves to (``"auto"`` is resolved here from the plan's costs);
    ``notes`` say what falls back and why.

    For each module whose parameters a rule covers: the rule, the strategy chosen for the
    planned block size (``"gram"``: feature Gram times cotangent Gram; ``"grads"``:
    per-example weight gradients then their Gram) with both strategies' estimated FLOPs
    (Novak et al. 2022); which parameters fall back to Jacobian contraction and why.
    """
    engine = plan.engine
    if not isinstance(engine, StructuredEngine):
        raise TypeError(f"a structured report needs a structured plan, got the {engine.name} engine")
    costs = plan.costs()
    chosen = min(costs, key=costs.get) if method == "auto" else method
    structured = plan.analysis.plan
    o, layout, block = plan.analysis.num_outputs, engine.layout, plan.block_size
    b1, b2 = min(block, plan.n1), min(block, plan.n2)
    same = plan.symmetric and b1 == plan.n1
    strategies = engine.strategies(b1, b2, same)
    kinds = [(b.rule, b.module_types) for b in structured.bundles] + [
        ("fallback (jacobian)", ()) for _ in structured.fallback
    ]
    terms = []
    for shape, (label, names), (rule, types), strategy, group in zip(
        engine.term_shapes, engine.term_labels(), kinds, strategies, engine.term_groups
    ):
        is_fallback = rule.startswith("fallback")
        terms.append(TermReport(
            modules="" if is_fallback else label,
            module_types=types,
            rule=rule,
            params=names,
            group=plan.groups[group].name,
            strategy=strategy,
            flops=strategy_flops(shape, layout, o, b1, b2, same),
            reason=structured.fallback.get(names[0], "") if is_fallback else "",
        ))
    return StructuredReport(
        tuple(terms), dict(structured.fallback), chosen, costs, block, layout.name, plan.n1, plan.n2, notes
    )
