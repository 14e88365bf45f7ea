r"""Choose the network before training it: rank a space of candidate configs by what the
kernel at initialisation predicts, and check the ranking against real training.

A *selection config* (YAML) names a ``base`` run config, a list of ``candidates`` (each a
mapping of run-config sections whose keys replace the base's: ``model`` is replaced whole,
the other sections key by key) and ``learning_rates``; every candidate is run at every
learning rate (``train.lr``). Optional ``forecast: {points: 256, test_points: 256,
lr_grid: 8, kernel: trace}``.

For each candidate, at initialisation only (:func:`candidate_signals`), on ``points``
training and ``test_points`` test examples drawn with the config's seed:

* the kernel ``K`` (``trace`` by default: the isotropic approximation, cheap for any
  model) and the linearised full-batch SGD forecast (:class:`ntk_torch.predict.LinearisedDynamics`)
  of the test loss and accuracy after ``train.steps`` steps at the candidate's learning rate;
* the largest stable learning rate, twice: ``max_learning_rate``, the worst-case bound
  (``2 / lambda_max`` of the loss-scaled kernel for MSE, the Hessian bound for
  cross-entropy), and ``local_max_learning_rate``, the cross-entropy rate at the initial
  logits (the top curvature of the linearised loss there, up to ``C / 2`` times the bound);
  and the learning rate the forecast prefers: the best forecast test accuracy (then lowest
  loss) over ``lr_grid`` rates spaced geometrically from ``max_lr / 64`` to ``0.95 max_lr``;
* trainability signals of ``K``: condition number, effective rank, centred kernel-target
  alignment (:mod:`ntk_torch.metrics`);
* the real network's check (``probe_steps``, default 10): that many full-batch steps at
  the candidate's rate on a copy of the initial model, on the same points, and the
  training loss before and after (``probe_loss_before``/``_after``).

The **score** (higher is better) is the forecast test accuracy at the candidate's own
learning rate, minus ``0.001 x`` the forecast test loss (a tie-break among equal
accuracies: predicted accuracies on a few hundred points tie often), minus 1 when the
candidate is not ``stable``: its probe's loss is not finite or did not decrease. Why: the
forecast is the only signal that sees the budget and the learning rate together, and it
is only worth trusting where the real network trains at that rate at all. The kernel
bounds did not say that: on the shipped digits space no trained network diverged at lr
1.5, up to 60 times the cross-entropy bound and 20 times the local rate, so a penalty
from either bound sank the best candidates (README, measured figures); what matters is
the real network's divergence, and the probe measures it directly, for the price of a few
forward and backward passes on ``points`` examples. The bounds are recorded, not scored.
The spectral signals are recorded beside the score (and measured against the trained
ranking by :func:`validate`) but not mixed in, since their sign of effect changes with
the budget. The kernel and every lr-independent signal are computed once per candidate.

:func:`validate` trains the top ``K`` and ``K`` others drawn at random (or all) with the
real loop (:func:`ntk_torch.experiment.train_loop`), and adds the trained test accuracy,
Kendall's tau-b and Spearman's rho between predicted and trained rankings, the regret and
the compute spent; with two baselines (parameter count; training loss after one epoch of
minibatch SGD at the candidate's learning rate).
"""

from __future__ import annotations

import copy
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import yaml

from .config import ConfigError, RunConfig, parse_config
from .experiment import build, make_optimizer, train_loop
from .kernel import NTK
from .losses import resolve
from .metrics import condition_number, effective_rank, target_alignment
from .predict import LinearisedDynamics

SELECTION_FILE = "selection.json"
FORECAST_DEFAULTS = {"points": 256, "test_points": 256, "lr_grid": 8, "kernel": "trace", "probe_steps": 10}
UNSTABLE_PENALTY = 1.0
LOSS_TIE_BREAK = 1e-3


@dataclass
class SelectionSpace:
    """A selection config expanded: ``configs`` one :class:`RunConfig` per candidate and
    learning rate (named ``<name>-c<i>-lr<lr>``), ``settings`` what each set on the base."""

    name: str
    configs: List[RunConfig]
    settings: List[Dict[str, Any]]
    forecast: Dict[str, Any]
    seed: int = 0


def load_space(path: Union[str, Path]) -> SelectionSpace:
    """The :class:`SelectionSpace` of the selection config at ``path``.

    Raises:
        ConfigError: not a mapping with ``base``, ``candidates`` and ``learning_rates``, an
            unknown ``forecast`` key, or a candidate that is not a valid run config.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: {error}") from None
    return parse_space(raw, str(path))


def parse_space(raw: Any, source: str = "<selection>") -> SelectionSpace:
    """:func:`load_space` of an already-parsed mapping."""
    if not isinstance(raw, dict) or not {"base", "candidates", "learning_rates"} <= set(raw):
        raise ConfigError(f"{source}: a selection config is a mapping with base, candidates and learning_rates")
    unknown = set(raw) - {"name", "seed", "base", "candidates", "learning_rates", "forecast"}
    if unknown:
        raise ConfigError(f"{source}: unknown selection keys {sorted(unknown)}")
    forecast = {**FORECAST_DEFAULTS, **(raw.get("forecast") or {})}
    if set(forecast) != set(FORECAST_DEFAULTS):
        raise ConfigError(f"{source}: forecast keys must be among {sorted(FORECAST_DEFAULTS)}, got {sorted(forecast)}")
    candidates, rates = raw["candidates"], raw["learning_rates"]
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, dict) for c in candidates):
        raise ConfigError(f"{source}: candidates must be a non-empty list of mappings")
    if not isinstance(rates, list) or not rates or not all(_is_positive(r) for r in rates):
        raise ConfigError(f"{source}: learning_rates must be a non-empty list of positive numbers, got {rates!r}")
    name = str(raw.get("name", "selection"))
    configs, settings = [], []
    for index, candidate in enumerate(candidates):
        for lr in rates:
            merged = _merged(raw["base"], candidate, lr, f"{name}-c{index:02d}-lr{lr:g}")
            configs.append(parse_config(merged, f"{source} candidate {index} lr {lr:g}"))
            settings.append({**copy.deepcopy(candidate), "lr": float(lr), "candidate": index})
    return SelectionSpace(name, configs, settings, forecast, int(raw.get("seed", 0)))


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def _merged(base: Any, candidate: Dict[str, Any], lr: float, name: str) -> Dict[str, Any]:
    merged = copy.deepcopy(base) if isinstance(base, dict) else {}
    for section, value in candidate.items():
        if section == "model" or not isinstance(value, dict) or not isinstance(merged.get(section), dict):
            merged[section] = copy.deepcopy(value)
        else:
            merged[section] = {**merged[section], **copy.deepcopy(value)}
    merged.setdefault("train", {})["lr"] = lr
    merged["name"] = name
    return merged


def _subset(n: int, count: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, count)]


def _kernel_state(config: RunConfig, forecast: Dict[str, Any]) -> Dict[str, Any]:
    """What every learning rate of one candidate shares (the model, data and kernel do not
    depend on ``train.lr``): the linearised dynamics, the kernel signals, ``seconds``."""
    start = time.perf_counter()
    setup = build(config)
    train = config.train
    if train.optimizer != "sgd" or (train.batch_size is not None and train.batch_size < setup.split.n_train) \
            or train.scheduler is not None:
        raise ConfigError(f"candidate {config.name}: select forecasts full-batch SGD at a constant lr "
                          "(train.optimizer: sgd, batch_size: null, no scheduler)")
    split, model = setup.split, setup.model
    index = _subset(split.n_train, forecast["points"], config.seed)
    test_index = _subset(split.n_test, forecast["test_points"], config.seed + 1)
    x, y = split.x_train[index], split.y_train[index]
    xt, yt = split.x_test[test_index], split.y_test[test_index]
    # one kernel of train and test points together: the train rows' Jacobians once
    joint = NTK(model, mode=forecast["kernel"], dtype=torch.float64)(torch.cat([x, xt]))
    K, K_test = joint[: len(x), : len(x)], joint[len(x):, : len(x)]
    with torch.no_grad():
        f0, f0_test = model(x).double(), model(xt).double()
    loss = resolve(config.train.loss)
    regression = loss.kind != "classification"
    dynamics = LinearisedDynamics(
        K, y.reshape(len(y), -1).double() if regression else y, f0.reshape(len(x), -1),
        loss=loss.for_outputs(tuple(f0.shape[1:])), k_test_train=K_test, f0_test=f0_test.reshape(len(xt), -1),
        y_test=yt.reshape(len(yt), -1).double() if regression else yt,
    )
    sgd = dict(momentum=train.momentum, weight_decay=train.weight_decay)
    max_lr = float(dynamics.max_learning_rate(**sgd))
    local_lr = max_lr if regression else _local_rate(K, f0.reshape(len(x), -1), max_lr, train.weight_decay)
    grid = [max_lr * float(r) for r in np.geomspace(1 / 64, 0.95, forecast["lr_grid"])]
    on_grid = [(*_forecast_at(dynamics, lr, train.steps, sgd), lr) for lr in grid]
    best = max(on_grid, key=lambda item: (_or(item[0], -math.inf), -_or(item[1], math.inf)))
    shared = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_learning_rate": max_lr, "local_max_learning_rate": local_lr,
        "preferred_lr": best[2], "preferred_lr_accuracy": best[0],
        "condition_number": float(condition_number(K)), "effective_rank": float(effective_rank(K)),
        "target_alignment": float(target_alignment(K, y)) if not regression else None,
    }
    return {"dynamics": dynamics, "sgd": sgd, "signals": shared, "seconds": time.perf_counter() - start,
            "model": model, "x": x, "y": y}


def _probe(config: RunConfig, state: Dict[str, Any], steps: int) -> Dict[str, Optional[float]]:
    """The real network's check of the forecast at ``train.lr``: ``steps`` full-batch steps
    of the config's optimizer on a copy of the initial model, on the forecast's training
    points; its training loss before and after (None when not finite)."""
    model = copy.deepcopy(state["model"])
    optimizer = make_optimizer(config, model)
    loss = resolve(config.train.loss).fn
    x, y = state["x"], state["y"]
    with torch.no_grad():
        before = float(loss(model(x), y))
    for _ in range(steps):
        optimizer.zero_grad()
        value = loss(model(x), y)
        if not torch.isfinite(value):
            break
        value.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss(model(x), y))
    return {"probe_loss_before": before if math.isfinite(before) else None,
            "probe_loss_after": after if math.isfinite(after) else None}


def _local_rate(K: torch.Tensor, f0: torch.Tensor, max_lr: float, weight_decay: float, iterations: int = 200) -> float:
    r"""The largest stable rate of cross-entropy at the initial logits ``f0`` (``(N, C)``):
    ``factor / (s + wd)``, ``s`` the top eigenvalue of the linearised loss's curvature
    :math:`J^\top H(f_0) J` there, i.e. of :math:`(K / C \otimes I_C)\,H(f_0)` with
    :math:`H` block diagonal, blocks :math:`(\mathrm{diag}(p_i) - p_i p_i^\top)/N`
    (power iteration); ``factor`` (``2 (1 + momentum)``) read back from the worst-case
    ``max_lr = factor / (\lambda_{max}(K/C) / (2N) + wd)``. Gradient descent started at
    ``f0`` grows along the top direction above this rate (the edge of stability at
    initialisation); the worst-case rate is below it by up to ``C / 2``."""
    n, c = f0.shape
    p = torch.softmax(f0, dim=1)
    per_output = K / c
    top = float(torch.linalg.eigvalsh(per_output)[-1])
    factor = max_lr * (top / (2 * n) + weight_decay)
    v = torch.randn(n, c, dtype=K.dtype, generator=torch.Generator().manual_seed(0))
    sharpness = 0.0
    for _ in range(iterations):
        w = per_output @ ((p * v - p * (p * v).sum(1, keepdim=True)) / n)
        sharpness, v = float(w.norm() / v.norm()), w / w.norm()
    return factor / (sharpness + weight_decay) if sharpness + weight_decay > 0 else math.inf


def candidate_signals(config: RunConfig, forecast: Dict[str, Any],
                      state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything :mod:`ntk_torch.selection` computes for one candidate at initialisation
    (module docstring): ``parameters``, ``predicted_test_accuracy``/``_loss`` at
    ``train.lr``, ``max_learning_rate`` (worst case), ``local_max_learning_rate`` (at the
    initial logits), ``stable``, ``preferred_lr`` and its forecast accuracy,
    ``condition_number``, ``effective_rank``, ``target_alignment``, ``seconds`` (this
    rate's forecast plus, when ``state`` is not given, the kernel). ``state``: a
    :func:`_kernel_state` of the same candidate at another rate, reused.

    Raises:
        ConfigError: the optimizer is not SGD or the config trains on minibatches (the
            forecast models full-batch SGD).
    """
    start = time.perf_counter()
    fresh = state is None
    state = _kernel_state(config, forecast) if fresh else state
    accuracy, test_loss = _forecast_at(state["dynamics"], config.train.lr, config.train.steps, state["sgd"])
    probe = _probe(config, state, forecast["probe_steps"])
    before, after = probe["probe_loss_before"], probe["probe_loss_after"]
    signals = {**state["signals"], "predicted_test_accuracy": accuracy, "predicted_test_loss": test_loss, **probe,
               "stable": before is not None and after is not None and after < before}
    signals["seconds"] = time.perf_counter() - start
    return signals


def _or(value: Optional[float], default: float) -> float:
    return default if value is None or not math.isfinite(value) else value


def _forecast_at(dynamics: LinearisedDynamics, lr: float, steps: int, sgd: Dict[str, float]):
    """``(test accuracy or None, test loss)`` of the linearised model after ``steps``."""
    prediction = dynamics.gd_trajectory(lr=lr, **sgd).at(steps)
    accuracy = None if prediction.test_accuracy is None else float(prediction.test_accuracy[0])
    return accuracy, float(prediction.test_loss[0])


def score(signals: Dict[str, Any]) -> float:
    """The predicted score (module docstring): forecast test accuracy (or minus the test
    loss without classes), ``-0.001 x`` test loss, ``-1`` when the lr is not stable."""
    loss = _or(signals["predicted_test_loss"], 1e6)
    accuracy = signals["predicted_test_accuracy"]
    value = (accuracy - LOSS_TIE_BREAK * loss) if accuracy is not None else -loss
    return value - (0.0 if signals["stable"] else UNSTABLE_PENALTY)


@dataclass
class Selection:
    """A ranked space: ``entries`` best first, each ``{"name", "settings", "signals",
    "score", "rank"}`` (and, after :func:`validate`, ``"trained"``); ``summary`` the
    validation's figures (empty before)."""

    name: str
    entries: List[Dict[str, Any]]
    forecast: Dict[str, Any]
    summary: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "forecast": self.forecast, "entries": self.entries, "summary": self.summary}


def rank(space: SelectionSpace, *, progress: bool = False) -> Selection:
    """Compute every candidate's signals and score, and rank them (rank 1 the best score;
    ties keep the config's order). The kernel and the lr-independent signals are computed
    once per candidate and reused for its learning rates."""
    entries, states = [], {}
    for config, settings in zip(space.configs, space.settings):
        first = settings["candidate"] not in states
        if first:  # one candidate's rates are consecutive: keep only its state
            states = {settings["candidate"]: _kernel_state(config, space.forecast)}
        state = states[settings["candidate"]]
        signals = candidate_signals(config, space.forecast, state)
        if first:  # the first rate of a candidate carries its kernel's seconds
            signals["seconds"] += state["seconds"]
        entries.append({"name": config.name, "settings": settings, "signals": signals, "score": score(signals)})
        if progress:
            print(f"  {config.name}: score {entries[-1]['score']:.4f} ({signals['seconds']:.1f}s)", flush=True)
    entries.sort(key=lambda e: -e["score"])
    for position, entry in enumerate(entries, start=1):
        entry["rank"] = position
    return Selection(space.name, entries, space.forecast)


# --------------------------------------------------------------------------- validation


def _pair_signs(values: np.ndarray) -> np.ndarray:
    """``sign(values[i] - values[j])`` by comparison, so that equal infinities tie."""
    return (values[:, None] > values[None, :]).astype(int) - (values[:, None] < values[None, :]).astype(int)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    r"""Kendall's tau-b of two equally long sequences (ties allowed):
    :math:`(C - D) / \sqrt{(n_0 - n_1)(n_0 - n_2)}` over all pairs, ``C``/``D`` the
    concordant/discordant pairs, :math:`n_0 = n(n-1)/2`, ``n_1``/``n_2`` the pairs tied in
    ``a``/``b``. NaN when either sequence is constant or shorter than 2."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-d sequences of one length, got {x.shape} and {y.shape}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("kendall_tau needs values that are not NaN (infinities are allowed)")
    upper = np.triu_indices(len(x), k=1)
    dx, dy = _pair_signs(x)[upper], _pair_signs(y)[upper]
    pairs = len(dx)
    tied_x, tied_y = int((dx == 0).sum()), int((dy == 0).sum())
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return float((dx * dy).sum() / denominator) if denominator > 0 else math.nan


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (ties share their mean
    rank). NaN when either sequence is constant or shorter than 2."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman_rho needs two 1-d sequences of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return math.nan
    rx, ry = _average_ranks(x) - (len(x) + 1) / 2, _average_ranks(y) - (len(y) + 1) / 2
    denominator = math.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def train_candidate(config: RunConfig) -> Dict[str, Any]:
    """Train ``config`` with the real loop (no tracker); its test accuracy, test and
    train loss, and seconds. A diverged run (non-finite outputs) scores accuracy 0."""
    start = time.perf_counter()
    setup = build(config)
    train_loop(setup, progress=False)
    loss = resolve(config.train.loss)
    split = setup.split
    with torch.no_grad():
        out_test, out_train = setup.model(split.x_test), setup.model(split.x_train)
    finite = bool(torch.isfinite(out_test).all())
    accuracy = float((out_test.argmax(1) == split.y_test).double().mean()) if finite else 0.0
    return {"test_accuracy": accuracy if loss.kind == "classification" else None,
            "test_loss": float(loss.fn(out_test, split.y_test)) if finite else math.inf,
            "train_loss": float(loss.fn(out_train, split.y_train)) if finite else math.inf,
            "diverged": not finite, "seconds": time.perf_counter() - start}


def one_epoch_loss(config: RunConfig, batch_size: int = 32) -> Dict[str, Any]:
    """The baseline: the training loss after one epoch of minibatch SGD (``batch_size``)
    at the candidate's learning rate, and its seconds."""
    n = build(config).split.n_train
    short = parse_config({**config.to_dict(), "train": {**config.to_dict()["train"], "batch_size": batch_size,
                                                       "steps": math.ceil(n / batch_size)}}, config.name)
    trained = train_candidate(short)
    return {"loss": trained["train_loss"], "seconds": trained["seconds"]}


def chosen_for_validation(selection: Selection, k: Union[int, str], seed: int = 0) -> List[str]:
    """The names :func:`validate` trains: all (``k="all"``), or the top ``k`` by score and
    ``k`` of the others drawn with ``numpy.random.default_rng(seed)``, in rank order."""
    names = [entry["name"] for entry in selection.entries]
    if k == "all":
        return names
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"validate must be a positive integer or 'all', got {k!r}")
    rest = names[k:]
    drawn = set(np.random.default_rng(seed).choice(len(rest), size=min(k, len(rest)), replace=False).tolist())
    picked = set(names[:k]) | {rest[i] for i in drawn}
    return [name for name in names if name in picked]


def validate(selection: Selection, space: SelectionSpace, k: Union[int, str], *,
             baselines: bool = True, progress: bool = False) -> Selection:
    """Train the candidates :func:`chosen_for_validation` names, add ``"trained"`` (and
    ``"one_epoch_loss"`` with ``baselines``) to their entries and the figures to
    ``selection.summary`` (:func:`summarise`); returns ``selection``."""
    configs = {config.name: config for config in space.configs}
    chosen = chosen_for_validation(selection, k, space.seed)
    for entry in selection.entries:
        if entry["name"] not in chosen:
            continue
        entry["trained"] = train_candidate(configs[entry["name"]])
        if baselines:
            entry["one_epoch"] = one_epoch_loss(configs[entry["name"]])
        if progress:
            print(f"  trained {entry['name']}: test accuracy {entry['trained']['test_accuracy']}", flush=True)
    selection.summary = summarise(selection)
    return selection


def _regret(trained: List[Dict[str, Any]], key: Any) -> Dict[str, Any]:
    """The pick of ``key`` (the highest) among the trained entries and its regret."""
    best = max(e["trained"]["test_accuracy"] for e in trained)
    pick = max(trained, key=key)
    return {"pick": pick["name"], "pick_accuracy": pick["trained"]["test_accuracy"],
            "regret": best - pick["trained"]["test_accuracy"]}


def _score_flagged_by(bound: str) -> Callable[[Dict[str, Any]], float]:
    """The score with ``stable`` decided by one of the kernel's rate bounds (the lr below
    it) instead of the probe: what the score would say without the real steps."""
    def flagged(entry: Dict[str, Any]) -> float:
        limit = _or(entry["signals"].get(bound), math.inf)
        return score({**entry["signals"], "stable": entry["settings"]["lr"] < limit})
    return flagged


# The score's parts measured alone, so that validation shows what each contributes.
ABLATIONS: Dict[str, Callable[[Dict[str, Any]], float]] = {
    "score_unflagged": lambda e: score({**e["signals"], "stable": True}),
    "forecast_test_loss": lambda e: -_or(e["signals"]["predicted_test_loss"], math.inf),
    "score_flagged_by_max_lr": _score_flagged_by("max_learning_rate"),
    "score_flagged_by_local_max_lr": _score_flagged_by("local_max_learning_rate"),
}


def summarise(selection: Selection) -> Dict[str, Any]:
    """The validation's figures over the trained entries: for the predicted score and each
    baseline (``parameters``: more is better; ``one_epoch_loss``: lower is better), Kendall
    tau-b and Spearman rho against trained test accuracy, the pick and its regret (best
    trained accuracy minus the pick's), also for each kernel signal and each of the
    score's parts alone (``ABLATIONS``); the compute: seconds of the signals of all
    candidates against the training of every candidate (measured when all were trained,
    else the mean trained seconds times the number of candidates)."""
    trained = [e for e in selection.entries if "trained" in e and e["trained"]["test_accuracy"] is not None]
    if not trained:
        return {"trained": [e["name"] for e in selection.entries if "trained" in e]}
    accuracy = [e["trained"]["test_accuracy"] for e in trained]
    methods = {"predicted": lambda e: e["score"], "parameters": lambda e: e["signals"]["parameters"]}
    if all("one_epoch" in e for e in trained):
        methods["one_epoch_loss"] = lambda e: -_or(e["one_epoch"]["loss"], math.inf)
    for signal in ("condition_number", "effective_rank", "target_alignment", "preferred_lr_accuracy"):
        if all(e["signals"].get(signal) is not None for e in trained):
            methods[signal] = (lambda s: lambda e: e["signals"][s])(signal)
    methods.update(ABLATIONS)
    ranking = {}
    for method, key in methods.items():
        values = [key(e) for e in trained]
        if any(math.isnan(v) for v in values):  # a signal undefined for some candidate ranks nothing
            ranking[method] = {"kendall_tau": math.nan, "spearman_rho": math.nan, "pick": None,
                               "pick_accuracy": math.nan, "regret": math.nan}
            continue
        ranking[method] = {"kendall_tau": kendall_tau(values, accuracy), "spearman_rho": spearman_rho(values, accuracy),
                           **_regret(trained, key)}
    selection_seconds = sum(e["signals"]["seconds"] for e in selection.entries)
    train_seconds = [e["trained"]["seconds"] for e in trained]
    everything = (sum(train_seconds) if len(trained) == len(selection.entries)
                  else float(np.mean(train_seconds)) * len(selection.entries))
    return {"trained": [e["name"] for e in trained], "best_trained_accuracy": max(accuracy),
            "ranking": ranking, "compute": {
                "selection_seconds": selection_seconds, "train_everything_seconds": everything,
                "validation_seconds": sum(train_seconds),
                "one_epoch_seconds": sum(e.get("one_epoch", {}).get("seconds", 0.0) for e in trained),
                "saving": everything / selection_seconds if selection_seconds > 0 else math.nan}}


# --------------------------------------------------------------------------- outputs

TABLE_COLUMNS = (
    ("rank", lambda e: e["rank"]), ("name", lambda e: e["name"]),
    ("params", lambda e: e["signals"]["parameters"]),
    ("pred acc", lambda e: e["signals"]["predicted_test_accuracy"]),
    ("pred loss", lambda e: e["signals"]["predicted_test_loss"]),
    ("lr", lambda e: e["settings"]["lr"]), ("max lr", lambda e: e["signals"]["max_learning_rate"]),
    ("pref lr", lambda e: e["signals"]["preferred_lr"]), ("cond", lambda e: e["signals"]["condition_number"]),
    ("eff rank", lambda e: e["signals"]["effective_rank"]), ("align", lambda e: e["signals"]["target_alignment"]),
    ("score", lambda e: e["score"]), ("trained acc", lambda e: e.get("trained", {}).get("test_accuracy")),
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(selection: Selection) -> str:
    """The ranking as a markdown table, best first."""
    rows = [[_cell(get(e)) for _, get in TABLE_COLUMNS] for e in selection.entries]
    head = [name for name, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def summary_lines(selection: Selection) -> List[str]:
    """The validation's figures, one line per ranking method, then the compute."""
    summary = selection.summary
    if "ranking" not in summary:
        return []
    lines = [f"{method}: Kendall tau {r['kendall_tau']:.3f}, Spearman rho {r['spearman_rho']:.3f}, pick {r['pick']} "
             f"(trained accuracy {r['pick_accuracy']:.4f}, regret {r['regret']:.4f})"
             for method, r in summary["ranking"].items()]
    c = summary["compute"]
    lines.append(f"compute: selection {c['selection_seconds']:.1f}s against training everything "
                 f"{c['train_everything_seconds']:.1f}s ({c['saving']:.1f}x less)")
    return lines


def save_figure(json_path: Path, stem: Path) -> Path:
    """``selection.png`` (and ``.svg``) drawn from the written ``selection.json``
    (:func:`ntk_torch.plots.selection.selection_figure`)."""
    from . import plots
    from .plots.selection import selection_figure

    figure = selection_figure(json_path).figure
    for fmt in ("png", "svg"):
        plots.save_figure(figure, stem.with_suffix(f".{fmt}"))
    return stem.with_suffix(".png")


def write_html(selection: Selection, path: Path, figure: Path) -> Path:
    """A self-contained page: the validation's figures, the figure and the ranking table."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in TABLE_COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(get(e)))}</td>" for _, get in TABLE_COLUMNS) + "</tr>"
                   for e in selection.entries)
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(selection))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(selection.name)}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 6px;border-bottom:1px solid #ddd}</style></head>"
            f"<body><h1>Selection: {html.escape(selection.name)}</h1><ul>{notes}</ul>"
            f"<img src='{html.escape(figure.name)}' alt='selection figure'><table><tr>{head}</tr>{rows}</table>"
            "</body></html>")
    path.write_text(page)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write(selection: Selection, out_dir: Union[str, Path]) -> Dict[str, Path]:
    """``selection.json`` (non-finite numbers as null), ``selection.png``/``.svg`` and
    ``selection.html`` in ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / SELECTION_FILE
    json_path.write_text(json.dumps(_json_safe(selection.to_dict()), indent=1))
    figure = save_figure(json_path, out_dir / "selection")
    return {"json": json_path, "figure": figure, "html": write_html(selection, out_dir / "selection.html", figure)}


def select(config: Union[str, Path, Dict[str, Any]], out_dir: Union[str, Path, None] = None, *,
           validate_k: Union[int, str, None] = None, baselines: bool = True, progress: bool = False) -> Selection:
    """Rank the selection config ``config`` (a path or a parsed mapping) before training,
    optionally validate it (``validate_k``: an int K or ``"all"``, :func:`validate`), and
    write ``selection.json``, the figure and the HTML page to ``out_dir`` (default
    ``runs/<name>``). Returns the :class:`Selection`."""
    space = parse_space(config) if isinstance(config, dict) else load_space(config)
    selection = rank(space, progress=progress)
    if validate_k is not None:
        validate(selection, space, validate_k, baselines=baselines, progress=progress)
    write(selection, Path("runs") / space.name if out_dir is None else out_dir)
    return selection
