"""What re-ranking and query expansion change: the exact metrics and the time of each post-processing method.

Two settings: a model's own test embeddings (a run's ``test_embeddings.npz``, written with
``save_test_embeddings=true``: the built-in data's unseen classes, every item a query searched among the others),
and a synthetic query/gallery set of DeepFashion In-Shop's test size (14,218 queries, 12,612 gallery images, 3,985
classes, 512-d), where each query is searched in the gallery only. Every method is scored by the same exact
metrics (:func:`metricsearch.metrics.postprocess.calc_postprocessed_metrics`), with the paper's settings: alpha-QE
and DBA with k = 2, alpha = 3; k-reciprocal with k1 = 20, k2 = 6, lambda = 0.3.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metricsearch.benchmarks.evaluation import QueryGalleryData, make_query_gallery_embeddings
from metricsearch.metrics.postprocess import POSTPROCESS_METHODS, calc_postprocessed_metrics

__all__ = ["format_postprocess_table", "measure_postprocess", "plot_postprocess", "run_postprocess_benchmark"]

RECALL_AT_K = (1, 2, 4, 8)
INSHOP_RECALL_AT_K = (1, 10, 20)


def measure_postprocess(
    name: str,
    embeddings: np.ndarray,
    labels: np.ndarray,
    recall_at_k: Sequence[int],
    methods: Sequence[str] = POSTPROCESS_METHODS,
    log: Callable[[str], None] = print,
    **gallery: np.ndarray,
) -> list[dict[str, Any]]:
    """One row per method: R@1, MAP@R and R-Precision in %, the change from ``none`` and the seconds it took."""
    rows = []
    for method in methods:
        start = time.perf_counter()
        metrics = calc_postprocessed_metrics(embeddings, labels, method, tuple(recall_at_k), **gallery)
        seconds = time.perf_counter() - start
        row = {"setting": name, "method": method, "seconds": round(seconds, 2)}
        row.update({key: round(100 * metrics[key], 2) for key in ("recall@1", "map@r", "r_precision")})
        row["num_queries"] = int(metrics["num_queries"])
        rows.append(row)
        log(f"{name:>24} {method:>13}: R@1 {row['recall@1']:6.2f}  MAP@R {row['map@r']:6.2f}  {seconds:7.2f} s")
    baseline = rows[0]
    for row in rows:
        for key in ("recall@1", "map@r"):
            row[f"{key} change"] = round(row[key] - baseline[key], 2)
    return rows


def run_postprocess_benchmark(
    embeddings_file: Path | None, inshop: bool = True, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Measures every method on the given test embeddings and (``inshop``) on the In-Shop-size synthetic set."""
    rows: list[dict[str, Any]] = []
    if embeddings_file is not None:
        saved = np.load(embeddings_file, allow_pickle=False)
        rows += measure_postprocess("built-in test classes", saved["embeddings"], saved["labels"], RECALL_AT_K, log=log)
    if inshop:
        queries, query_labels, gallery, gallery_labels = make_query_gallery_embeddings(QueryGalleryData())
        rows += measure_postprocess(
            "In-Shop-size synthetic", queries, query_labels, INSHOP_RECALL_AT_K, log=log,
            gallery_embeddings=gallery, gallery_labels=gallery_labels,
        )  # fmt: skip
    return rows


def format_postprocess_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| setting | method | R@1 % | change | MAP@R % | change | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['method']} | {row['recall@1']:.2f} | {row['recall@1 change']:+.2f} | "
            f"{row['map@r']:.2f} | {row['map@r change']:+.2f} | {row['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_postprocess(rows: Sequence[dict[str, Any]]) -> Any:
    """Grouped bars of the R@1 and MAP@R change of each method, one panel per setting."""
    from matplotlib.figure import Figure

    settings = list(dict.fromkeys(row["setting"] for row in rows))
    figure = Figure(figsize=(5 * len(settings), 3.8))
    axes = np.atleast_1d(figure.subplots(1, len(settings)))
    for ax, setting in zip(axes, settings, strict=True):
        chosen = [row for row in rows if row["setting"] == setting and row["method"] != "none"]
        positions = np.arange(len(chosen))
        for offset, key, colour in ((-0.2, "recall@1 change", "tab:blue"), (0.2, "map@r change", "tab:orange")):
            ax.bar(positions + offset, [row[key] for row in chosen], width=0.4, color=colour, label=key.split()[0])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(positions, [row["method"] for row in chosen])
        ax.set_ylabel("change from no post-processing (points)")
        ax.set_title(setting, fontsize=10)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure
