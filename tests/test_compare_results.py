"""Reading ``make compare``'s files (``metricsearch.analysis.compare_results``): rankings, the search's learning curve
and the validation-test agreement checked on given numbers, and ``notebooks/compare.ipynb`` run top to bottom on the
committed results of the measured comparison."""

from __future__ import annotations

import json
import math

import nbformat
import pytest
from nbclient import NotebookClient

from metricsearch.analysis.compare_results import (
    COMPARE_ENV,
    best_so_far,
    format_ranking_markdown,
    load_compare_results,
    plot_best_so_far,
    plot_parameter_effects,
    plot_run_spread,
    ranking_rows,
    validation_test_rows,
)
from metricsearch.analysis.files import write_csv
from tests.helpers import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "compare.ipynb"
COMMITTED = REPO_ROOT / "results" / "compare"
METRICS = ("recall@1", "map@r")

# Three losses. Default-parameter test means: a 0.30, b 0.20, c 0.10; tuned: a 0.32, b 0.40, c 0.32 (a tie).
MEANS = {("a", "default"): 0.30, ("b", "default"): 0.20, ("c", "default"): 0.10,
         ("a", "tuned"): 0.32, ("b", "tuned"): 0.40, ("c", "tuned"): 0.32}  # fmt: skip
# Trials in storage order, some not counted: (loss, trial, state, in_budget, objective, params).
TRIALS = [
    ("a", 1, "COMPLETE", "True", 0.20, {"loss.margin": 0.5}),
    ("a", 0, "COMPLETE", "True", 0.10, {"loss.margin": 0.1}),
    ("a", 2, "FAIL", "True", "", {"loss.margin": 0.9}),
    ("a", 3, "COMPLETE", "True", 0.15, {"loss.margin": 0.3}),
    ("a", 4, "COMPLETE", "False", 0.90, {"loss.margin": 0.7}),  # over the budget: not counted
    ("b", 0, "COMPLETE", "True", 0.05, {"loss.alpha": 2.0}),
    ("b", 1, "COMPLETE", "True", 0.30, {"loss.alpha": 40.0}),
    ("c", 0, "COMPLETE", "True", 0.25, {"loss.scale": 8.0}),
]


def write_results(folder, means=MEANS, trials=TRIALS) -> None:
    summary = [
        {"dataset": "toy", "loss": loss, "kind": kind, "metric": metric, "mean": mean * (1 if metric == "recall@1"
         else 0.5), "ci_low": mean - 0.01, "ci_high": mean + 0.01, "n": 4, "folder": f"toy/{loss}"}
        for (loss, kind), mean in means.items() for metric in METRICS
    ]  # fmt: skip
    write_csv(folder / "summary.csv", summary)
    runs = [
        {"dataset": "toy", "loss": loss, "kind": kind, "key": "", "current": "True", "seed": seed, "fold": 0,
         "recall@1": mean + 0.01 * seed, "map@r": mean / 2, "folder": f"toy/{loss}/{kind}/seed{seed}"}
        for (loss, kind), mean in means.items() for seed in range(3)
    ]  # fmt: skip
    write_csv(folder / "runs.csv", runs)
    names = sorted({name for *_, params in trials for name in params})
    rows = [
        {"dataset": "toy", "loss": loss, "trial": trial, "state": state, "in_budget": in_budget,
         "objective": objective, "params": json.dumps(params),
         **{f"param:{name}": params.get(name, "") for name in names}}
        for loss, trial, state, in_budget, objective, params in trials
    ]  # fmt: skip
    write_csv(folder / "trials.csv", rows, columns=list(rows[0]))


def test_ranking_rows_put_default_and_tuned_ranks_side_by_side(tmp_path):
    write_results(tmp_path)
    results = load_compare_results(tmp_path)
    assert results.datasets == ["toy"] and results.losses("toy") == ["a", "b", "c"]
    rows = {row["loss"]: row for row in ranking_rows(results, "toy")}
    # Default: a 1st, b 2nd, c 3rd. Tuned: b 1st, a and c tie for 2nd.
    assert [(r["default_rank"], r["tuned_rank"], r["rank_change"]) for r in rows.values()] == [(2, 1, 1), (1, 2, -1),
                                                                                                (3, 2, 1)]  # fmt: skip
    assert list(rows) == ["b", "a", "c"]  # best tuned first; ties by name
    assert rows["b"]["gain"] == pytest.approx(0.20) and rows["a"]["gain"] == pytest.approx(0.02)
    table = format_ranking_markdown(ranking_rows(results, "toy"))
    assert "| b | 20.0 | 2 | 40.0 | 1 | up 1 | +20.0 |" in table
    assert "| a | 30.0 | 1 | 32.0 | 2 | down 1 | +2.0 |" in table
    # Another metric reads its own rows.
    assert ranking_rows(results, "toy", "map@r")[0]["tuned"] == pytest.approx(0.20)


def test_a_loss_without_numbers_ranks_last(tmp_path):
    means = {**MEANS}
    del means[("c", "tuned")]
    write_results(tmp_path, means=means)
    rows = {row["loss"]: row for row in ranking_rows(load_compare_results(tmp_path), "toy")}
    assert math.isnan(rows["c"]["tuned"]) and rows["c"]["tuned_rank"] == 3


def test_best_so_far_counts_only_completed_trials_within_the_budget_in_trial_order(tmp_path):
    write_results(tmp_path)
    results = load_compare_results(tmp_path)
    # Trial order 0 (0.10), 1 (0.20), 3 (0.15); the failed trial 2 and the over-budget trial 4 do not count.
    assert best_so_far(results, "toy", "a") == [(1, 0.10), (2, 0.20), (3, 0.20)]
    assert best_so_far(results, "toy", "b") == [(1, 0.05), (2, 0.30)]
    assert best_so_far(results, "toy", "missing") == []


def test_validation_test_agreement_is_the_rank_correlation_of_the_searches_and_the_tests(tmp_path):
    write_results(tmp_path)
    rows, rho = validation_test_rows(load_compare_results(tmp_path), "toy")
    assert [(r["loss"], r["validation_map_at_r"], r["test_map_at_r"]) for r in rows] == [
        ("a", 0.20, pytest.approx(0.16)), ("b", 0.30, pytest.approx(0.20)), ("c", 0.25, pytest.approx(0.16))
    ]  # fmt: skip
    assert rows[0]["params"] == {"loss.margin": 0.5}  # the best counted trial's, not the over-budget one's
    # Validation ranks a, b, c as 1, 3, 2; the test (MAP@R = half the tuned means) as 1.5, 3, 1.5 (a tie: average
    # ranks). Their correlation, Spearman's rho, is 1.5 / sqrt(2 * 1.5) = sqrt(3) / 2.
    assert rho == pytest.approx(math.sqrt(3) / 2)
    # Reversed test means: perfect disagreement.
    means = {**MEANS, ("a", "tuned"): 0.40, ("b", "tuned"): 0.10, ("c", "tuned"): 0.30}
    write_results(tmp_path, means=means)
    assert validation_test_rows(load_compare_results(tmp_path), "toy")[1] == pytest.approx(-1.0)


def test_plots_draw_one_mark_per_loss_trial_and_model(tmp_path):
    write_results(tmp_path)
    results = load_compare_results(tmp_path)
    curves = plot_best_so_far(results, "toy").axes[0].get_lines()
    assert [line.get_label() for line in curves] == ["a", "b", "c"]
    assert list(curves[0].get_ydata()) == pytest.approx([10.0, 20.0, 20.0])
    effects = plot_parameter_effects(results, "toy", "b")
    # b varied loss.alpha only (2 and 40: a log axis, ratio 20), over its two counted trials.
    assert len(effects.axes) == 1 and effects.axes[0].get_xscale() == "log"
    assert list(effects.axes[0].get_lines()[0].get_xdata()) == [2.0, 40.0]
    spread = plot_run_spread(results, "toy")
    assert sum(len(line.get_xdata()) for line in spread.axes[0].get_lines()) == 6 * 3  # 3 losses x 2 kinds x 3 runs


def test_a_results_folder_without_the_files_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no trials.csv, runs.csv, summary.csv: run `make compare`"):
        load_compare_results(tmp_path)


def test_the_committed_comparison_reads_as_the_readme_reports_it():
    results = load_compare_results(COMMITTED)
    rows = {row["loss"]: row for row in ranking_rows(results, "synthetic")}
    assert len(rows) == 6
    # The best tuned loss, and NT-Xent, whose tuned setting tests below its default (README, "Fair loss comparison").
    assert rows["multi_similarity"]["tuned_rank"] == 1
    assert rows["ntxent"]["gain"] < 0 < rows["proxy_anchor"]["gain"]


def test_committed_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None for cell in nb.cells if cell.cell_type == "code"
    )


def test_notebook_executes_on_the_committed_comparison(python3_kernel, monkeypatch):
    monkeypatch.setenv(COMPARE_ENV, str(COMMITTED))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name=python3_kernel, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    # One learning curve, six parameter plots and one spread plot for the one dataset.
    assert len(images) == 1 + 6 + 1
    text = "\n".join(out.get("data", {}).get("text/markdown", "") for out in outputs)
    assert "| multi_similarity | 14.4 | 1 | 15.5 | 1 | = |" in text
    assert "Spearman's rho over the losses" in text
