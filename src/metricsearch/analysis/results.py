"""Aggregating a grid of finished runs (``make reproduce``) into mean ± std tables, a CSV and plots.

A grid lives under ``<results>/runs/<dataset>/<loss>/seed<seed>/``, each cell a complete run folder whose
``metrics.json`` (written last and atomically by the training pipeline) marks it as finished.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metricsearch.analysis.run_folder import REPRODUCE_INFO, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The metrics of the tables, in column order; Recall@K columns come first, in increasing K, from what was logged.
SUMMARY_METRICS = ("map@r", "r_precision", "nmi")
MARKDOWN_METRICS = ("map@r", "r_precision")
METRIC_TITLES = {"map@r": "MAP@R", "r_precision": "R-Precision", "nmi": "NMI"}
# How a run's tested model was chosen, as the tables print it (see metricsearch.pipelines.selection).
SELECTION_LABELS = {"val": "val", "last": "last", "test_best": "test_best (optimistic)", "mixed": "mixed"}
_SEED_DIR = re.compile(r"^seed(-?\d+)$")


@dataclass(frozen=True)
class RunResult:
    """The test metrics of one finished cell of the grid."""

    dataset: str
    loss: str
    seed: int
    metrics: dict[str, float]
    seconds: float | None = None
    # How the tested model was chosen (metrics.json's selection): val, last or test_best (optimistic).
    selection: str = "val"


@dataclass
class SummaryRow:
    """Mean and sample standard deviation over the seeds of one (dataset, loss)."""

    dataset: str
    loss: str
    seeds: list[int]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    # The runs' selection mode ("mixed" when they differ) and, for a paper recipe, the published numbers.
    selection: str = "val"
    published: dict[str, float] = field(default_factory=dict)


def cell_dir(results_dir: str | Path, dataset: str, loss: str, seed: int) -> Path:
    """The run folder of one cell of the grid."""
    return Path(results_dir) / "runs" / dataset / loss / f"seed{seed}"


def read_run_result(run_dir: str | Path, dataset: str, loss: str, seed: int) -> RunResult | None:
    """The test metrics of a finished run folder, or None when it has no complete ``metrics.json``."""
    run_dir = Path(run_dir)
    try:
        summary = read_metrics(run_dir)
        metrics = {k: float(v) for k, v in summary["metrics"]["test"].items()}
        selection = str((summary.get("selection") or {}).get("mode", "val"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    seconds = None
    # The training time is recorded by `make reproduce` only; a run folder from elsewhere has none.
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        seconds = float(json.loads((run_dir / REPRODUCE_INFO).read_text(encoding="utf-8"))["seconds"])
    return RunResult(dataset, loss, seed, metrics, seconds, selection)


def collect_results(results_dir: str | Path) -> list[RunResult]:
    """Every finished cell under ``<results_dir>/runs``, sorted by dataset, loss and seed."""
    results = []
    for seed_dir in sorted(Path(results_dir).glob("runs/*/*/seed*")):
        match = _SEED_DIR.match(seed_dir.name)
        if not match or not seed_dir.is_dir():
            continue
        result = read_run_result(seed_dir, seed_dir.parent.parent.name, seed_dir.parent.name, int(match.group(1)))
        if result is not None:
            results.append(result)
    return sorted(results, key=lambda r: (r.dataset, r.loss, r.seed))


def recall_keys(metric_names: Sequence[str]) -> list[str]:
    """The ``recall@K`` names among ``metric_names``, in increasing K.

    Example:
        >>> recall_keys(["map@r", "recall@8", "recall@1", "recall@2"])
        ['recall@1', 'recall@2', 'recall@8']
    """
    keys = [name for name in metric_names if re.fullmatch(r"recall@\d+", name)]
    return sorted(set(keys), key=lambda name: int(name.split("@")[1]))


def summarize_results(results: Sequence[RunResult]) -> list[SummaryRow]:
    """Groups runs by (dataset, loss); mean and sample std (ddof=1; 0 for a single seed) of every metric.

    Rows are ordered by dataset, then by decreasing mean Recall@1.
    """
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.dataset, result.loss), []).append(result)
    rows = []
    for (dataset, loss), runs in groups.items():
        modes = {r.selection for r in runs}
        row = SummaryRow(
            dataset, loss, sorted(r.seed for r in runs), selection=modes.pop() if len(modes) == 1 else "mixed"
        )
        names = dict.fromkeys(name for r in runs for name in r.metrics)
        for name in names:
            values = np.array([r.metrics[name] for r in runs if name in r.metrics], dtype=np.float64)
            row.mean[name] = float(values.mean())
            row.std[name] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return sorted(rows, key=lambda r: (r.dataset, -r.mean.get("recall@1", 0.0), r.loss))


def summary_columns(rows: Sequence[SummaryRow], metrics: Sequence[str] = SUMMARY_METRICS) -> list[str]:
    """Metric names for the columns of a table of ``rows``: Recall@K in increasing K, then ``metrics``."""
    names = [name for row in rows for name in row.mean]
    return recall_keys(names) + [m for m in metrics if m in names]


def summary_csv_rows(rows: Sequence[SummaryRow]) -> tuple[list[dict[str, Any]], list[str]]:
    """The summary as CSV rows (fractions, not percent) and their column names."""
    metrics = summary_columns(rows)
    columns = ["dataset", "loss", "num_seeds", "seeds"]
    columns += [f"{m}_{stat}" for m in metrics for stat in ("mean", "std")]
    out = []
    for row in rows:
        record: dict[str, Any] = {
            "dataset": row.dataset,
            "loss": row.loss,
            "num_seeds": len(row.seeds),
            "seeds": " ".join(map(str, row.seeds)),
        }
        for m in metrics:
            record[f"{m}_mean"] = _round(row.mean.get(m))
            record[f"{m}_std"] = _round(row.std.get(m))
        out.append(record)
    return out, columns


def metric_title(name: str) -> str:
    """A column title: ``recall@4`` -> ``R@4``, ``map@r`` -> ``MAP@R``."""
    if name.startswith("recall@"):
        return "R@" + name.split("@", 1)[1]
    return METRIC_TITLES.get(name, name)


def format_results_markdown(rows: Sequence[SummaryRow], *, header: str = "", footer: str = "") -> str:
    """One markdown table per dataset: loss, seeds, Recall@K, MAP@R and R-Precision as mean ± std in percent.

    A dataset whose rows include a paper recipe or a selection other than ``val`` gets two more columns: how the
    tested model was chosen (``test_best`` marked optimistic) and the paper's Recall@1 beside ours.
    """
    lines = [header.rstrip(), ""] if header else []
    for dataset in dict.fromkeys(row.dataset for row in rows):
        dataset_rows = [row for row in rows if row.dataset == dataset]
        metrics = summary_columns(dataset_rows, MARKDOWN_METRICS)
        with_protocol = any(row.published or row.selection != "val" for row in dataset_rows)
        extra_titles = ["selection", "paper R@1"] if with_protocol else []
        lines.append(f"### {dataset}")
        lines.append("")
        lines.append("| " + " | ".join(["loss", "seeds", *extra_titles, *map(metric_title, metrics)]) + " |")
        lines.append("|---|---:|" + "---|---:|" * bool(extra_titles) + "---:|" * len(metrics))
        for row in dataset_rows:
            cells = [_pm(row.mean.get(m), row.std.get(m), len(row.seeds)) for m in metrics]
            if with_protocol:
                paper = row.published.get("recall@1")
                cells = [
                    SELECTION_LABELS.get(row.selection, row.selection),
                    "" if paper is None else f"{paper:.1f}",
                ] + cells
            lines.append(f"| {row.loss} | {len(row.seeds)} | " + " | ".join(cells) + " |")
        lines.append("")
    if footer:
        lines.append(footer.rstrip())
        lines.append("")
    return "\n".join(lines)


def plot_metric_bars(rows: Sequence[SummaryRow], metric: str = "recall@1", title: str = "") -> Figure:
    """Grouped bar chart of one metric (percent) per loss, one bar per dataset, error bars of one std.

    Returns:
        A matplotlib Figure.
    """
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(row.dataset for row in rows))
    # Losses in the order of the first dataset's ranking (rows arrive sorted by decreasing Recall@1).
    losses = list(dict.fromkeys(row.loss for row in rows))
    by_key = {(row.dataset, row.loss): row for row in rows}
    fig = Figure(figsize=(max(5.0, 1.1 * len(losses) + 1.5), 4.2), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(datasets))
    x = np.arange(len(losses))
    for d, dataset in enumerate(datasets):
        means = [
            100 * by_key[(dataset, loss)].mean.get(metric, math.nan) if (dataset, loss) in by_key else math.nan
            for loss in losses
        ]
        stds = [
            100 * by_key[(dataset, loss)].std.get(metric, 0.0) if (dataset, loss) in by_key else 0.0 for loss in losses
        ]
        bars = ax.bar(x + (d - (len(datasets) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=dataset)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, losses, rotation=30, ha="right")
    ax.set_ylabel(f"{metric_title(metric)} (%)")
    ax.set_title(title or f"Test {metric_title(metric)} on unseen classes (mean ± std over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(datasets) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_recall_curves(rows: Sequence[SummaryRow], dataset: str | None = None, title: str = "") -> Figure:
    """Recall@K against K for every loss of one dataset (the first one by default), with std error bars.

    Returns:
        A matplotlib Figure.
    """
    from matplotlib.figure import Figure

    dataset = dataset or (rows[0].dataset if rows else "")
    dataset_rows = [row for row in rows if row.dataset == dataset]
    keys = summary_columns(dataset_rows, metrics=())
    fig = Figure(figsize=(6.5, 4.2), dpi=100)
    ax = fig.add_subplot()
    positions = np.arange(len(keys))
    for row in dataset_rows:
        means = [100 * row.mean.get(k, math.nan) for k in keys]
        stds = [100 * row.std.get(k, 0.0) for k in keys]
        ax.errorbar(positions, means, yerr=stds, marker="o", capsize=3, label=row.loss)
    ax.set_xticks(positions, [metric_title(k) for k in keys])
    ax.set_ylabel("Recall@K (%)")
    ax.set_title(title or f"{dataset}: Recall@K per loss (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def _pm(mean: float | None, std: float | None, num_seeds: int) -> str:
    if mean is None or math.isnan(mean):
        return ""
    if num_seeds < 2 or std is None:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _round(value: float | None) -> float | str:
    return "" if value is None else round(value, 6)
