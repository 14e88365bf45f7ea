"""ntk_torch.select / ntk-torch select: the ranking before training, selection.json, --validate."""

import json
import math

import numpy as np
import pytest
import scipy.stats

import ntk_torch
from ntk_torch import selection
from ntk_torch.cli import main
from ntk_torch.config import ConfigError

TINY = {
    "name": "tiny",
    "base": {
        "seed": 0,
        "data": {"name": "digits", "options": {"test_size": 0.2}},
        "model": {"name": "mlp", "options": {"width": 8}},
        "train": {"optimizer": "sgd", "lr": 0.1, "steps": 5, "loss": "cross_entropy"},
    },
    "candidates": [{"model": {"name": "mlp", "options": {"width": 8, "depth": 1}}},
                   {"model": {"name": "mlp", "options": {"width": 16, "depth": 2}}}],
    "learning_rates": [0.05, 0.5],
    "forecast": {"points": 24, "test_points": 24, "lr_grid": 3},
}
SIGNALS = {"parameters", "predicted_test_accuracy", "predicted_test_loss", "max_learning_rate", "stable",
           "local_max_learning_rate", "probe_loss_before", "probe_loss_after",
           "preferred_lr", "preferred_lr_accuracy", "condition_number", "effective_rank", "target_alignment",
           "seconds"}


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("select")
    trained = []
    original = selection.train_candidate

    def counting(config):
        trained.append((config.name, config.train.steps))
        return original(config)

    selection.train_candidate = counting
    try:
        result = ntk_torch.select(TINY, out, validate_k=1)
    finally:
        selection.train_candidate = original
    return result, out, trained


@pytest.mark.slow
def test_select_writes_a_complete_selection_json(validated):
    result, out, _ = validated
    written = json.loads((out / "selection.json").read_text())
    assert [e["name"] for e in written["entries"]] == [e["name"] for e in result.entries]
    assert [e["rank"] for e in written["entries"]] == [1, 2, 3, 4]
    scores = [e["score"] for e in written["entries"]]
    assert scores == sorted(scores, reverse=True)
    for entry in written["entries"]:
        assert set(entry["signals"]) == SIGNALS
        assert entry["settings"]["lr"] in (0.05, 0.5) and "model" in entry["settings"]
        assert 0 <= entry["signals"]["predicted_test_accuracy"] <= 1
        signals = entry["signals"]  # the local rate is above the worst-case bound; stable is the probe's verdict
        assert signals["local_max_learning_rate"] >= signals["max_learning_rate"] * (1 - 1e-9)
        assert signals["stable"] == (signals["probe_loss_after"] < signals["probe_loss_before"])
    assert {e["settings"]["candidate"] for e in written["entries"]} == {0, 1}
    assert (out / "selection.png").stat().st_size > 0 and "<table>" in (out / "selection.html").read_text()


@pytest.mark.slow
def test_validate_trains_exactly_the_candidates_it_says(validated):
    result, _, trained = validated
    chosen = selection.chosen_for_validation(result, 1, seed=0)
    assert chosen[0] == result.entries[0]["name"] and len(chosen) == 2
    full_runs = [name for name, steps in trained if steps == 5]  # the one-epoch baseline runs are shorter
    assert sorted(full_runs) == sorted(chosen) == sorted(result.summary["trained"])
    assert sorted(e["name"] for e in result.entries if "trained" in e) == sorted(chosen)


@pytest.mark.slow
def test_the_summary_kendall_tau_is_computed_from_the_entries(validated):
    result, _, _ = validated
    trained = [e for e in result.entries if "trained" in e]
    expected = scipy.stats.kendalltau([e["score"] for e in trained], [e["trained"]["test_accuracy"] for e in trained])
    tau = result.summary["ranking"]["predicted"]["kendall_tau"]
    assert tau == pytest.approx(expected.statistic) or (np.isnan(tau) and np.isnan(expected.statistic))
    best = max(e["trained"]["test_accuracy"] for e in trained)
    pick = result.summary["ranking"]["predicted"]
    assert pick["pick"] == result.entries[0]["name"] and pick["regret"] == pytest.approx(best - pick["pick_accuracy"])
    assert result.summary["compute"]["selection_seconds"] > 0


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_b_and_spearman_rho_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 4, size=12).astype(float), rng.integers(0, 5, size=12).astype(float)
    assert selection.kendall_tau(a, b) == pytest.approx(scipy.stats.kendalltau(a, b).statistic)
    assert selection.spearman_rho(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic)
    assert np.isnan(selection.kendall_tau([1.0, 1.0], [1.0, 2.0]))


@pytest.mark.slow
def test_the_summary_measures_the_scores_parts_alone(validated):
    result, _, _ = validated
    trained = [e for e in result.entries if "trained" in e]
    ranking = result.summary["ranking"]
    accuracy = [e["trained"]["test_accuracy"] for e in trained]
    unflagged = [e["signals"]["predicted_test_accuracy"] - selection.LOSS_TIE_BREAK * e["signals"]["predicted_test_loss"]
                 for e in trained]
    by_bound = [u - selection.UNSTABLE_PENALTY * (e["settings"]["lr"] >= e["signals"]["max_learning_rate"])
                for u, e in zip(unflagged, trained)]
    for method, values in (("score_unflagged", unflagged), ("score_flagged_by_max_lr", by_bound),
                           ("forecast_test_loss", [-e["signals"]["predicted_test_loss"] for e in trained])):
        expected = scipy.stats.kendalltau(values, accuracy).statistic
        tau = ranking[method]["kendall_tau"]
        assert tau == pytest.approx(expected) or (np.isnan(tau) and np.isnan(expected)), method


def test_kendall_tau_ties_equal_infinities_and_refuses_nan():
    """A diverged forecast scores -inf: two of them tie, as two equal finite values do."""
    a, b = [-math.inf, -math.inf, 0.2, 0.5, 0.9], [0.1, 0.3, 0.2, 0.6, 0.8]
    finite = [-1e9, -1e9, 0.2, 0.5, 0.9]
    assert selection.kendall_tau(a, b) == pytest.approx(scipy.stats.kendalltau(finite, b).statistic)
    assert selection.spearman_rho(a, b) == pytest.approx(scipy.stats.spearmanr(finite, b).statistic)
    with pytest.raises(ValueError, match="not NaN"):
        selection.kendall_tau([math.nan, 1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.slow
def test_a_signal_that_is_nan_for_a_candidate_ranks_nothing_and_the_rest_stands():
    entries = [{"name": f"c{i}", "settings": {"lr": 0.1}, "score": float(i), "trained": {"test_accuracy": 0.1 * i, "seconds": 1.0},
                "signals": {"parameters": 10 * i, "condition_number": math.nan if i == 1 else float(i),
                            "predicted_test_accuracy": 0.1 * i, "predicted_test_loss": 1.0 - 0.1 * i,
                            "max_learning_rate": 1.0, "local_max_learning_rate": 1.0, "seconds": 0.5}}
               for i in range(4)]
    ranking = selection.summarise(selection.Selection("nan", entries, {}))["ranking"]
    assert math.isnan(ranking["condition_number"]["kendall_tau"]) and ranking["condition_number"]["pick"] is None
    assert ranking["predicted"]["kendall_tau"] == pytest.approx(1.0) and ranking["predicted"]["regret"] == 0.0


def test_validate_all_and_bad_k(validated):
    result, _, _ = validated
    assert selection.chosen_for_validation(result, "all") == [e["name"] for e in result.entries]
    with pytest.raises(ValueError, match="validate must be a positive integer or 'all'"):
        selection.chosen_for_validation(result, 0)


def test_selection_configs_are_checked():
    with pytest.raises(ConfigError, match="base, candidates and learning_rates"):
        selection.parse_space({"base": {}})
    with pytest.raises(ConfigError, match="learning_rates must be"):
        selection.parse_space({**TINY, "learning_rates": [0]})
    with pytest.raises(ConfigError, match="forecast keys"):
        selection.parse_space({**TINY, "forecast": {"pionts": 3}})
    minibatch = {**TINY, "base": {**TINY["base"], "train": {**TINY["base"]["train"], "batch_size": 32}}}
    with pytest.raises(ConfigError, match="full-batch SGD"):
        selection.rank(selection.parse_space(minibatch))


@pytest.mark.slow
def test_cli_select_prints_the_table_and_writes_the_files(tmp_path, capsys):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "candidates": TINY["candidates"][:1]}))
    assert main(["select", str(path), "--out", str(tmp_path / "out"), "--validate", "all", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| rank | name |" in printed and "predicted: Kendall tau" in printed
    assert (tmp_path / "out" / "selection.json").exists()
    assert main(["select", str(path), "--validate", "zero"]) != 0
    assert "--validate must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_the_selection_figure_is_drawn_from_selection_json(validated, tmp_path):
    from ntk_torch.plots.selection import selection_figure

    _, out, _ = validated
    ax = selection_figure(out)  # the directory or the file
    assert len(ax.collections) >= 1 and "Kendall tau" in ax.get_title()
    assert selection_figure(out / "selection.json").get_xlabel() == "predicted score"
    (tmp_path / "selection.json").write_text("[]")
    with pytest.raises(ValueError, match="not a selection.json"):
        selection_figure(tmp_path)
