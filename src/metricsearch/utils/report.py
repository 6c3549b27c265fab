"""Human-readable summaries of metric dicts."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

# Counts of queries, not fractions: printed as whole numbers, with no gain.
COUNTS = ("num_queries", "num_queries_left_out")


def format_metrics_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A table with one row per metric and one column per evaluation (untrained, test, ...), plus the gain."""
    columns = [c for c in ("untrained", "val_best", "test") if c in results] + [
        c for c in results if c not in ("untrained", "val_best", "test")
    ]
    names = list(dict.fromkeys(name for c in columns for name in results[c]))
    table = Table(title=title or None)
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    show_gain = "untrained" in results and "test" in results
    if show_gain:
        table.add_column("gain", justify="right")
    for name in names:
        row = [name]
        for column in columns:
            value = results[column].get(name)
            row.append("" if value is None else _fmt(name, value))
        if show_gain:
            before, after = results["untrained"].get(name), results["test"].get(name)
            row.append("" if before is None or after is None or name in COUNTS else f"{100 * (after - before):+.1f}")
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=120, force_terminal=False, force_jupyter=False).print(table)
    return buffer.getvalue()


def _fmt(name: str, value: float) -> str:
    return f"{int(value)}" if name in COUNTS else f"{100 * value:.2f}"
