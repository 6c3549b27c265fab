"""Reading and plotting the files ``make compare`` writes (``results/compare/``), for ``notebooks/compare.ipynb``.

``make compare`` itself writes the headline table and the interval plot; these functions answer the questions a
reader of that table asks next, from its three CSVs alone (no study database, no run folders needed):

- How did the ranking move when every loss was tuned? (:func:`ranking_rows`: default-parameter rank beside tuned
  rank, same runs, same budget.)
- Was the search budget enough? (:func:`best_so_far` / :func:`plot_best_so_far`: a curve still rising at the last
  trial says more trials would have found more.)
- Which parameters mattered? (:func:`plot_parameter_effects`: each trial's objective against each searched value.)
- What is behind each interval? (:func:`plot_run_spread`: every fold x seed model's test value.)
- Did validation pick what the test rewards? (:func:`validation_test_rows`: the search's best validation MAP@R
  beside the tuned models' test MAP@R, and their rank correlation.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from metricsearch.analysis.files import read_csv

__all__ = [
    "COMPARE_ENV",
    "CompareResults",
    "best_so_far",
    "format_ranking_markdown",
    "load_compare_results",
    "plot_best_so_far",
    "plot_parameter_effects",
    "plot_run_spread",
    "ranking_rows",
    "validation_test_rows",
]

# The environment variable that points the comparison notebook at another results folder.
COMPARE_ENV = "METRICSEARCH_COMPARE"
FILES = ("trials.csv", "runs.csv", "summary.csv")
PARAM_PREFIX = "param:"


@dataclass(frozen=True)
class CompareResults:
    """The rows of ``trials.csv``, ``runs.csv`` and ``summary.csv`` (values as the CSV holds them: strings)."""

    trials: list[dict[str, str]]
    runs: list[dict[str, str]]
    summary: list[dict[str, str]]

    @property
    def datasets(self) -> list[str]:
        """The datasets compared, in the order the summary lists them."""
        return list(dict.fromkeys(row["dataset"] for row in self.summary))

    def losses(self, dataset: str) -> list[str]:
        """The losses compared on ``dataset``, in the order the summary lists them."""
        return list(dict.fromkeys(row["loss"] for row in self.summary if row["dataset"] == dataset))


def load_compare_results(results_dir: str | os.PathLike[str]) -> CompareResults:
    """Reads the three CSVs of a ``make compare`` results folder.

    Raises:
        FileNotFoundError: a CSV is missing; the message says which and how to produce it.
    """
    folder = Path(results_dir)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} has no {', '.join(missing)}: run `make compare` (or point {COMPARE_ENV} at its results folder)"
        )
    return CompareResults(*(read_csv(folder / name) for name in FILES))


def _number(value: str) -> float:
    return float(value) if value not in ("", None) else math.nan


def _interval(results: CompareResults, dataset: str, loss: str, kind: str, metric: str) -> tuple[float, float, float]:
    for row in results.summary:
        if (row["dataset"], row["loss"], row["kind"], row["metric"]) == (dataset, loss, kind, metric):
            return _number(row["mean"]), _number(row["ci_low"]), _number(row["ci_high"])
    return math.nan, math.nan, math.nan


def _ranks(values: Sequence[float]) -> list[int]:
    """1 for the largest value, 2 for the next...; ties share the better rank; NaN ranks last."""
    keyed = [(-v if not math.isnan(v) else math.inf) for v in values]
    return [1 + sum(other < mine for other in keyed) for mine in keyed]


def ranking_rows(results: CompareResults, dataset: str, metric: str = "recall@1") -> list[dict[str, Any]]:
    """Each loss's test ``metric`` at its default parameters and tuned, with both ranks, best tuned first.

    Both columns come from the same protocol (same folds, seeds, epochs); only the loss's parameters differ, so the
    rank change is what tuning did to the comparison.

    Returns:
        Rows ``{"loss", "default", "default_rank", "tuned", "tuned_rank", "rank_change", "gain"}``: means as
        fractions, ``rank_change`` positive when the loss moved up, ``gain`` = tuned - default.
    """
    losses = results.losses(dataset)
    default = [_interval(results, dataset, loss, "default", metric)[0] for loss in losses]
    tuned = [_interval(results, dataset, loss, "tuned", metric)[0] for loss in losses]
    default_rank, tuned_rank = _ranks(default), _ranks(tuned)
    rows = [
        {
            "loss": loss,
            "default": default[i],
            "default_rank": default_rank[i],
            "tuned": tuned[i],
            "tuned_rank": tuned_rank[i],
            "rank_change": default_rank[i] - tuned_rank[i],
            "gain": tuned[i] - default[i],
        }
        for i, loss in enumerate(losses)
    ]
    return sorted(rows, key=lambda row: (row["tuned_rank"], row["loss"]))


def format_ranking_markdown(rows: Sequence[dict[str, Any]], metric: str = "recall@1") -> str:
    """:func:`ranking_rows` as a markdown table, in percent."""

    def move(change: int) -> str:
        return f"up {change}" if change > 0 else f"down {-change}" if change < 0 else "="

    lines = [
        f"| loss | default {metric} | rank | tuned {metric} | rank | moved | tuning gain (points) |",
        "|---|---:|---:|---:|---:|:---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['loss']} | {100 * row['default']:.1f} | {row['default_rank']} | {100 * row['tuned']:.1f} | "
            f"{row['tuned_rank']} | {move(row['rank_change'])} | {100 * row['gain']:+.1f} |"
        )
    return "\n".join(lines)


def _budget_trials(results: CompareResults, dataset: str, loss: str) -> list[dict[str, str]]:
    """The complete trials that count towards the budget, in trial order."""
    rows = [
        row
        for row in results.trials
        if row["dataset"] == dataset and row["loss"] == loss and row["state"] == "COMPLETE"
        and row.get("in_budget", "True") == "True"
    ]  # fmt: skip
    return sorted(rows, key=lambda row: int(row["trial"]))


def best_so_far(results: CompareResults, dataset: str, loss: str) -> list[tuple[int, float]]:
    """``(n, best objective among the first n counted trials)`` for n = 1..trials: the search's learning curve."""
    curve, best = [], -math.inf
    for n, row in enumerate(_budget_trials(results, dataset, loss), start=1):
        best = max(best, _number(row["objective"]))
        curve.append((n, best))
    return curve


def plot_best_so_far(results: CompareResults, dataset: str) -> Any:
    """One line per loss: the best validation MAP@R found after each counted trial."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    ax = fig.add_subplot()
    for loss in results.losses(dataset):
        curve = best_so_far(results, dataset, loss)
        if curve:
            ax.step([n for n, _ in curve], [100 * v for _, v in curve], where="post", marker="o", label=loss)
    ax.set_xlabel("trials spent")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("best validation MAP@R so far (%)")
    ax.set_title(f"{dataset}: is the budget enough? (a curve still rising wants more trials)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_parameter_effects(results: CompareResults, dataset: str, loss: str) -> Any:
    """Each counted trial's objective against each parameter the search varied (log axis for wide positive ranges);
    the best trial is ringed."""
    from matplotlib.figure import Figure

    trials = _budget_trials(results, dataset, loss)
    names = [key for key in (trials[0] if trials else {}) if key.startswith(PARAM_PREFIX)]
    names = [n for n in names if any(row[n] != "" for row in trials)]
    fig = Figure(figsize=(3.2 * max(1, len(names)), 3.0), dpi=100)
    if not names:
        fig.text(0.5, 0.5, f"{loss}: no completed trials", ha="center")
        return fig
    objective = np.array([100 * _number(row["objective"]) for row in trials])
    best = int(np.nanargmax(objective))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        values = np.array([_number(row[name]) for row in trials])
        ax.plot(values, objective, "o", alpha=0.8)
        ax.plot(values[best], objective[best], "o", markersize=12, markerfacecolor="none", color="tab:red")
        finite = values[np.isfinite(values)]
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(name.removeprefix(PARAM_PREFIX))
        if i == 0:
            ax.set_ylabel("validation MAP@R (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{dataset} / {loss}: {len(trials)} trials (ringed: the best)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_run_spread(results: CompareResults, dataset: str, metric: str = "recall@1") -> Any:
    """Every final model's test ``metric``, per loss, tuned and at default parameters: the points behind the
    intervals (a mean over few, scattered models is a weak claim)."""
    from matplotlib.figure import Figure

    losses = results.losses(dataset)
    fig = Figure(figsize=(6.4, 0.5 * len(losses) + 1.6), dpi=100)
    ax = fig.add_subplot()
    for offset, (kind, marker) in enumerate((("tuned", "o"), ("default", "s"))):
        for y, loss in enumerate(losses):
            values = [
                100 * _number(row[metric])
                for row in results.runs
                if row["dataset"] == dataset and row["loss"] == loss and row["kind"] == kind
                and row.get("current", "True") == "True"
            ]  # fmt: skip
            ax.plot(values, [y + 0.15 - 0.3 * offset] * len(values), marker, alpha=0.7, color=f"C{offset}",
                    label=(kind if kind == "tuned" else "default params") if y == 0 else None)  # fmt: skip
    ax.set_yticks(range(len(losses)), losses)
    ax.set_xlabel(f"test {metric} (%), one point per fold x seed model")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def validation_test_rows(results: CompareResults, dataset: str) -> tuple[list[dict[str, Any]], float]:
    """The search's best validation MAP@R beside the tuned models' mean test MAP@R, per loss, and Spearman's rank
    correlation between the two over the losses (NaN with fewer than 3 losses).

    A high correlation says the validation folds rank the losses as the test classes do, so the search optimised
    the right thing; a low one says the comparison is within the validation noise.
    """
    rows = []
    for loss in results.losses(dataset):
        curve = best_so_far(results, dataset, loss)
        rows.append(
            {
                "loss": loss,
                "validation_map_at_r": curve[-1][1] if curve else math.nan,
                "test_map_at_r": _interval(results, dataset, loss, "tuned", "map@r")[0],
                "params": _best_params(results, dataset, loss),
            }
        )
    pairs = [(r["validation_map_at_r"], r["test_map_at_r"]) for r in rows]
    pairs = [p for p in pairs if not any(math.isnan(v) for v in p)]
    rho = float(stats.spearmanr(*zip(*pairs, strict=True)).statistic) if len(pairs) >= 3 else math.nan
    return rows, rho


def _best_params(results: CompareResults, dataset: str, loss: str) -> dict[str, Any]:
    trials = _budget_trials(results, dataset, loss)
    if not trials:
        return {}
    best = max(trials, key=lambda row: _number(row["objective"]))
    return json.loads(best["params"]) if best.get("params") else {}
