"""Plots and tables about trained embeddings and about grids of runs, shared by callbacks, scripts and notebooks."""

from metricsearch.analysis.files import read_csv, save_figure, save_image, write_csv
from metricsearch.analysis.projection import (
    plot_projection,
    project_to_2d,
    projection_rows,
    read_projection_table,
    sample_evenly,
)
from metricsearch.analysis.results import (
    RunResult,
    SummaryRow,
    cell_dir,
    collect_results,
    format_results_markdown,
    plot_metric_bars,
    plot_recall_curves,
    summarize_results,
)
from metricsearch.analysis.retrieval_examples import (
    RetrievalExamples,
    choose_queries,
    draw_retrieval_grid,
    find_retrieval_examples,
    retrieval_rows,
)
from metricsearch.analysis.runs import (
    draw_run_retrieval,
    find_latest_run,
    find_run_table,
    format_run_metrics_markdown,
    load_run_metrics,
    plot_run_projection,
    read_retrieval_table,
    resolve_notebook_inputs,
)

__all__ = [
    "RetrievalExamples",
    "RunResult",
    "SummaryRow",
    "cell_dir",
    "choose_queries",
    "collect_results",
    "draw_retrieval_grid",
    "draw_run_retrieval",
    "find_latest_run",
    "find_retrieval_examples",
    "find_run_table",
    "format_results_markdown",
    "format_run_metrics_markdown",
    "load_run_metrics",
    "plot_metric_bars",
    "plot_projection",
    "plot_recall_curves",
    "plot_run_projection",
    "project_to_2d",
    "projection_rows",
    "read_csv",
    "read_projection_table",
    "read_retrieval_table",
    "resolve_notebook_inputs",
    "retrieval_rows",
    "sample_evenly",
    "save_figure",
    "save_image",
    "summarize_results",
    "write_csv",
]
