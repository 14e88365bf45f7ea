"""The structured-derivatives engine: module and function rules, Jacobian contraction for the rest."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from ...functional import FunctionalModel, Inputs, ParamGroup, batch_size
from ...layout import Layout
from ..cost import ForwardProfile
from ..engine import Engine
from .capture import assemble, capture
from .per_example import capture_per_example
from .plan import StructuredPlan
from .terms import (
    GradientTerm,
    KroneckerTerm,
    Term,
    TermShape,
    add_term,
    choose_strategy,
    strategy_bytes,
    symmetric_chunks,
    take_examples,
)

logger = logging.getLogger("ntk_torch.kernel")


@dataclass
class _Side:
    """The per-block state of one side: one term per bundle, then the fallback terms."""

    n: int
    terms: List[Term]


class StructuredEngine(Engine):
    """Kernel blocks from module and function rules (Novak et al. 2022, "structured
    derivatives").

    A block's examples are captured once (:func:`.capture.capture`): each covered call's
    input and the cotangents of its output for every network output, plus the Jacobians
    of the fallback parameters. Every bundle of covered parameters is contracted by the
    cheaper of its strategies (:mod:`.terms`), chosen per block size by FLOP count;
    fallback parameters are contracted like the Jacobian engine does. Contributions are
    accumulated per parameter group, so ``per_layer`` kernels are exact even when a group
    is split between rules and fallback.

    Args:
        plan: the coverage decided by :func:`.plan.analyse` for this model and selection.
        per_example: capture with plain autograd one example at a time
            (:func:`.per_example.capture_per_example`), for a model ``vmap`` cannot run.
        (others as :class:`~ntk_torch.kernel.engine.Engine`.)
    """

    name = "structured"

    def __init__(
        self,
        fmodel: FunctionalModel,
        layout: Layout,
        groups: Sequence[ParamGroup],
        profile: ForwardProfile,
        memory_budget: int,
        *,
        plan: StructuredPlan,
        per_example: bool = False,
    ):
        super().__init__(fmodel, layout, groups, profile, memory_budget)
        self.plan = plan
        self.per_example = per_example
        group_of_param = {name: i for i, g in enumerate(self.groups) for name in g.param_names}
        self.fallback_names = list(plan.fallback)
        owners: List[int] = []
        for bundle in plan.bundles:
            owner = {group_of_param[name] for name in bundle.param_names}
            if len(owner) != 1:
                raise ValueError(f"parameters {bundle.param_names} span several requested groups")
            owners.append(owner.pop())
        owners += [group_of_param[name] for name in self.fallback_names]
        self.term_shapes = plan.term_shapes(fmodel)
        self.term_groups = owners
        self._choices: Dict[Tuple[int, int, bool], List[str]] = {}

    # --- per-side work ------------------------------------------------------------------

    def _chunk(self, n: int) -> int:
        """Outputs per backward batch, so the capture's transient stays within a quarter of
        the budget: ``n (1 + 2 c) activation_bytes``."""
        o, act = self.num_outputs, self.profile.activation_bytes
        limit = self.memory_budget // 4
        return int(min(o, max(1, (limit // max(n * act, 1) - 1) // 2)))

    def prepare_rows(self, x: Inputs) -> _Side:
        n = batch_size(x, "x")
        if self.per_example:
            records, cotangents, jacobians = capture_per_example(self.plan, self.fmodel, x)
        else:
            records, cotangents, jacobians = capture(self.plan, self.fmodel, x, self._chunk(n))
        terms = assemble(self.plan, records, cotangents)
        o = self.num_outputs
        terms += [GradientTerm(jacobians[name].reshape(n, o, -1)) for name in self.fallback_names]
        return _Side(n, terms)

    prepare_cols = prepare_rows

    def cols_from_rows(self, rows: _Side, x: Inputs) -> _Side:
        return rows  # one capture, feature Grams of the same inputs, gradients formed once

    # --- contraction --------------------------------------------------------------------

    def strategies(self, n1: int, n2: int, same: bool) -> List[str]:
        """The strategy of each term for an ``n1 x n2`` block (logged once per size)."""
        key = (n1, n2, same)
        if key not in self._choices:
            chosen = []
            for shape, (label, _) in zip(self.term_shapes, self.term_labels()):
                strategy, flops = choose_strategy(shape, self.layout, self.num_outputs, n1, n2, same)
                chosen.append(strategy)
                logger.debug(
                    "structured: %s -> %s for %dx%d blocks (%s)", label, strategy, n1, n2,
                    ", ".join(f"{k} {v:.3g} FLOPs" for k, v in flops.items()),
                )
            self._choices[key] = chosen
        return self._choices[key]

    def term_labels(self) -> List[Tuple[str, Tuple[str, ...]]]:
        """``(module paths or "fallback", parameter names)`` per term."""
        labels = [(b.label, b.param_names) for b in self.plan.bundles]
        return labels + [("fallback", (name,)) for name in self.fallback_names]

    def contract(self, rows: _Side, cols: _Side) -> Dict[str, torch.Tensor]:
        """Each group's block (a view of the work layout, see :func:`.terms.finish`).

        With ``rows is cols`` (a diagonal block of ``x2=None``) only the upper block
        triangle is computed, in example chunks, and mirrored: the block is exactly
        symmetric (:attr:`exact_symmetric`) for about ``(k + 1) / 2k`` of the work.
        """
        same = rows is cols
        fmodel, layout, o = self.fmodel, self.layout, self.num_outputs
        accs = [
            torch.zeros(layout.work_shape(rows.n, cols.n, o), dtype=fmodel.dtype, device=fmodel.device)
            for _ in self.groups
        ]
        strategies = self.strategies(rows.n, cols.n, same)
        if not same:
            for term1, term2, group, strategy in zip(rows.terms, cols.terms, self.term_groups, strategies):
                add_term(accs[group], term1, term2, layout, strategy)
        else:
            bounds = symmetric_chunks(rows.n, layout, o)
            for term, group, strategy in zip(rows.terms, self.term_groups, strategies):
                if strategy == "grads" and isinstance(term, KroneckerTerm):
                    term.grads()  # formed once for the whole side, then sliced
                for a, b in bounds:
                    add_term(
                        layout.work_upper(accs[group], a, b),
                        take_examples(term, a, b),
                        take_examples(term, a, rows.n),
                        layout,
                        strategy,
                    )
            for acc in accs:
                layout.mirror_work(acc, o, bounds)
        return {g.name: layout.from_work(acc) for g, acc in zip(self.groups, accs)}

    exact_symmetric = True

    # --- cost ---------------------------------------------------------------------------

    def side_bytes(self, n: int) -> int:
        """A side's state (features, cotangents, fallback Jacobians) and capture transient."""
        s, o = self.profile.itemsize, self.num_outputs
        state = 0
        for shape in self.term_shapes:
            if shape.kind == "gradient":
                state += o * shape.num_params
            else:  # features (an index counts as one value) and cotangents
                width = 1 if shape.gram_flops == 1 else shape.width
                state += shape.groups * shape.positions * (width + o * shape.d_out)
        transient = (1 + 2 * self._chunk(n)) * self.profile.activation_bytes
        return n * (state * s + transient)

    def block_bytes(self, n_rows: int, n_cols: int) -> int:
        s, o = self.profile.itemsize, self.num_outputs
        contraction = max(
            sum(
                strategy_bytes(shape, strategy, self.layout, o, n_rows, n_cols, s)
                for shape, strategy in zip(self.term_shapes, self.strategies(n_rows, n_cols, same))
            )
            for same in ((False, True) if n_rows == n_cols else (False,))
        )
        return self.side_bytes(n_rows) + self.side_bytes(n_cols) + contraction + self.kernel_bytes(n_rows, n_cols)

    def estimated_flops(self, n1: int, n2: int, symmetric: bool) -> float:
        """FLOPs of the whole kernel: the capture (one forward and ``O`` backward passes
        per example, about ``3 O F``) and every term's cheaper strategy."""
        return structured_cost(self.plan, self.profile, self.layout, n1, n2, symmetric, self.term_shapes)


def structured_cost(
    plan: StructuredPlan,
    profile: ForwardProfile,
    layout: Layout,
    n1: int,
    n2: int,
    symmetric: bool,
    shapes: Sequence[TermShape],
) -> float:
    """Estimated FLOPs of the structured engine on the whole ``n1 x n2`` kernel.

    The capture costs one forward pass and ``O`` backward passes per example that form
    gradients of activations only (about ``F`` each), plus weight gradients for the
    fallback share ``P_fb / P`` of the parameters; each term then costs its cheaper
    strategy (:func:`.terms.strategy_flops`), over half the pairs when symmetric.
    """
    o, f, p = profile.num_outputs, profile.flops, profile.num_params
    fallback = sum(s.num_params for s in shapes[len(plan.bundles):])
    examples = n1 if symmetric else n1 + n2
    total = examples * f * (1.0 + o * (1.0 + fallback / max(p, 1)))
    scale = 0.5 if symmetric else 1.0
    for shape in shapes:
        _, flops = choose_strategy(shape, layout, o, n1, n2, symmetric)
        total += min(flops.values()) * scale
    return total
