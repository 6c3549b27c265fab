"""notebooks/analysis.ipynb executes top to bottom on a tiny grid and a tiny run, so it cannot rot unnoticed."""

from __future__ import annotations

import json

import nbformat
from nbclient import NotebookClient

from metricsearch.analysis.results import cell_dir
from metricsearch.analysis.runs import RESULTS_ENV, RUN_ENV
from metricsearch.pipelines.train import train
from tests.helpers import REPO_ROOT, compose_config

NOTEBOOK = REPO_ROOT / "notebooks" / "analysis.ipynb"


def test_committed_notebook_is_clean():
    """Outputs are not committed: they would hold one machine's results and bloat every diff."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None for cell in nb.cells if cell.cell_type == "code"
    )


def test_notebook_executes_on_a_tiny_grid(tmp_path, data_dir, python3_kernel, monkeypatch):
    results = tmp_path / "results"
    # One real tiny cell, drawn like a reproduce cell (test set only)...
    run = cell_dir(results, "synthetic", "triplet", 0)
    train(compose_config(["callbacks.visualization.prefixes=[test]"], run, data_dir))
    # ...and two more cells made from it, so the tables have a standard deviation and two losses.
    summary = json.loads((run / "metrics.json").read_text())
    for loss, seed, shift in (("triplet", 1, 0.05), ("supcon", 0, 0.1)):
        other = cell_dir(results, "synthetic", loss, seed)
        other.mkdir(parents=True)
        measured = summary["metrics"]["test"]
        test = {k: v if k.startswith("num_queries") else min(1.0, v + shift) for k, v in measured.items()}
        (other / "metrics.json").write_text(json.dumps({**summary, "metrics": {**summary["metrics"], "test": test}}))

    monkeypatch.setenv(RESULTS_ENV, str(results))
    monkeypatch.setenv(RUN_ENV, str(run))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name=python3_kernel, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    markdown = "".join(out.get("data", {}).get("text/markdown", "") for out in outputs)
    assert "| triplet | 2 |" in markdown and "| supcon | 1 |" in markdown
    assert "| recall@1 |" in markdown  # the run's metrics table
    texts = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert str(run) in texts
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    # Recall@K curves, the Recall@1 bars, the embedding map and the retrieval grid.
    assert len(images) >= 4
