"""Command line of ``scripts/docs_tables.py``: the results tables of README.md and docs/, from ``results/``.

The work is in :mod:`metricsearch.analysis.docs_tables`; ``make docs`` runs this before ``mkdocs build``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from metricsearch.cli.args import Arguments, Command, Option, run_command

REPO_ROOT = Path(__file__).resolve().parents[3]

DOCS_TABLES = Command(
    name="docs_tables",
    summary=(
        "Write the results tables of README.md and docs/*.md (between their '<!-- generated: NAME -->' markers) "
        "from the committed files under results/ and the recipe cards of conf/experiment/. With check=true, write "
        "nothing and exit 1 when a page's table differs from what would be generated."
    ),
    options={
        "root": Option(str(REPO_ROOT), "the repository whose README.md, docs/, results/ and conf/ are used"),
        "check": Option(False, "only compare; exit 1 naming each stale table"),
    },
)


def docs_pages(root: Path) -> list[Path]:
    """README.md and every markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def _docs_tables(args: Arguments) -> int:
    from metricsearch.analysis.docs_tables import DocsSources, stale_tables, update_pages

    root = Path(args["root"])
    pages, sources = docs_pages(root), DocsSources.of_repository(root)
    if args["check"]:
        stale = stale_tables(pages, sources)
        for entry in stale:
            print(f"stale generated table: {entry} (run `make docs` or `python scripts/docs_tables.py`)")
        return 1 if stale else 0
    for page in update_pages(pages, sources):
        print(f"updated {page.relative_to(root)}")
    return 0


def main_docs_tables(argv: Sequence[str] | None = None) -> int:
    """``scripts/docs_tables.py``."""
    return run_command(DOCS_TABLES, argv, _docs_tables, {FileNotFoundError: 1, KeyError: 1})


if __name__ == "__main__":
    sys.exit(main_docs_tables())
