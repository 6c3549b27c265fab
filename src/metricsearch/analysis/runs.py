"""Reading one run folder back: its metrics, and the projection and retrieval tables the run drew.

The visualization callback writes ``plots/`` and ``tables/`` into every run folder; these helpers find the most
telling ones (the final test evaluation, else the latest validation) so a notebook can redraw them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from metricsearch.analysis.files import read_csv
from metricsearch.analysis.projection import plot_projection, read_projection_table
from metricsearch.analysis.retrieval_examples import RetrievalExamples, draw_retrieval_grid
from metricsearch.analysis.run_folder import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Environment variables that point the analysis notebook at its inputs.
RESULTS_ENV = "METRICSEARCH_RESULTS"
RUN_ENV = "METRICSEARCH_RUN"


def find_latest_run(outputs_dir: str | Path) -> Path | None:
    """The most recently finished run folder (one holding ``metrics.json``) under ``outputs_dir``, or None."""
    candidates = [p.parent for p in Path(outputs_dir).glob(f"*/{METRICS_FILE}")]
    return max(candidates, key=lambda p: (p / METRICS_FILE).stat().st_mtime, default=None)


def resolve_notebook_inputs(root: str | Path | None = None) -> tuple[Path, Path | None]:
    """The results folder and run folder the analysis notebook reads.

    ``METRICSEARCH_RESULTS`` and ``METRICSEARCH_RUN`` choose them; the defaults are ``results/`` and the newest
    finished run under ``outputs/train/``, relative to the repository root (the notebook's parent folder when it
    runs from ``notebooks/``).

    Args:
        root: The repository root; found from the working directory when None.

    Returns:
        ``(results_dir, run_dir)``; ``run_dir`` is None when no run was found.
    """
    if root is None:
        cwd = Path.cwd()
        root = cwd.parent if cwd.name == "notebooks" else cwd
    root = Path(root)
    results_dir = Path(os.environ.get(RESULTS_ENV) or root / "results")
    run_env = os.environ.get(RUN_ENV)
    run_dir = Path(run_env) if run_env else find_latest_run(root / "outputs" / "train")
    return results_dir, run_dir


def load_run_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of a run: ``{"metrics": {"untrained": ..., "val_best": ..., "test": ...}, ...}``."""
    return read_metrics(run_dir)


def find_run_table(run_dir: str | Path, kind: str) -> Path | None:
    """The most telling ``tables/<kind>_*.csv`` of a run: the test one, else the latest validation epoch.

    Args:
        run_dir: The run folder.
        kind: ``projection`` or ``retrieval``.
    """
    tables = Path(run_dir) / "tables"
    test = tables / f"{kind}_test.csv"
    if test.is_file():
        return test
    epochs = sorted(tables.glob(f"{kind}_epoch*.csv"))
    return epochs[-1] if epochs else None


def plot_run_projection(table: str | Path, title: str = "") -> Figure:
    """Redraws the 2-D embedding map of a projection table written by the visualization callback."""
    coords, labels, method = read_projection_table(read_csv(table))
    title = title or f"{method.upper()} of {len(coords)} embeddings ({Path(table).stem})"
    return plot_projection(coords, labels, title, method=method)


def read_retrieval_table(table: str | Path) -> tuple[RetrievalExamples, dict[int, str]]:
    """The examples of a retrieval table written by the visualization callback, and the image path of each index."""
    rows = read_csv(table)
    queries = list(dict.fromkeys(int(r["query"]) for r in rows))
    k = max((int(r["rank"]) for r in rows), default=0)
    shape = (len(queries), k)
    neighbor_indices = np.zeros(shape, dtype=np.int64)
    neighbor_labels = np.zeros(shape, dtype=np.int64)
    scores = np.zeros(shape, dtype=np.float32)
    query_labels = np.zeros(len(queries), dtype=np.int64)
    paths: dict[int, str] = {}
    position = {q: i for i, q in enumerate(queries)}
    for r in rows:
        q, rank = position[int(r["query"])], int(r["rank"]) - 1
        query_labels[q] = int(r["query_label"])
        neighbor_indices[q, rank] = int(r["neighbor"])
        neighbor_labels[q, rank] = int(r["neighbor_label"])
        scores[q, rank] = float(r["score"])
        paths[int(r["query"])] = r["query_path"]
        paths[int(r["neighbor"])] = r["neighbor_path"]
    examples = RetrievalExamples(
        np.array(queries, dtype=np.int64), query_labels, neighbor_indices, neighbor_labels, scores
    )
    return examples, paths


def draw_run_retrieval(table: str | Path, thumbnail_size: int = 64) -> Image.Image:
    """Redraws the retrieval grid of a retrieval table (the images must still be where the run read them)."""
    examples, paths = read_retrieval_table(table)
    correct = examples.correct
    title = f"{Path(table).stem}: {int(correct.sum())}/{correct.size} of the top-{correct.shape[1]} correct"
    return draw_retrieval_grid(examples, paths, thumbnail_size=thumbnail_size, title=title)


def format_run_metrics_markdown(results: dict[str, dict[str, float]]) -> str:
    """A run's ``metrics.json`` metrics as a markdown table in percent: one row per metric, one column per
    evaluation (untrained, val_best, test), and the test gain over the untrained model.
    """
    columns = [c for c in ("untrained", "val_best", "test") if c in results]
    columns += [c for c in results if c not in columns]
    names = list(dict.fromkeys(name for c in columns for name in results[c] if not name.startswith("num_queries")))
    gain = "untrained" in results and "test" in results
    lines = ["| metric | " + " | ".join(columns) + (" | gain |" if gain else " |")]
    lines.append("|---|" + "---:|" * (len(columns) + gain))
    for name in names:
        cells = [f"{100 * results[c][name]:.2f}" if name in results[c] else "" for c in columns]
        if gain:
            before, after = results["untrained"].get(name), results["test"].get(name)
            cells.append(f"{100 * (after - before):+.1f}" if before is not None and after is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
