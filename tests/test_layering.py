"""The package's layers, read from its imports: low-level packages never import high-level ones.

- ``utils`` is a leaf: it imports nothing from the other subpackages.
- ``data``, ``models`` and ``metrics`` (the low level) and ``callbacks`` and ``analysis`` (what a training run
  plugs in) never import ``inference``, ``pipelines``, ``search``, ``benchmarks`` or ``cli`` (the high level: a
  model turned into embeddings, workflows, the search service, measurements and command lines).
- ``inference`` (loading a model, embedding images, exporting) is below everything that uses it: it never imports
  ``pipelines``, ``search``, ``benchmarks`` or ``cli``.
- Evaluation, export and the benchmarks that do not measure the search service never import ``search``: they need
  a model's embeddings (``inference``), not an index or a server.

Imports inside functions count too: a late import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "metricsearch"
HIGH_LEVEL = {"inference", "pipelines", "search", "benchmarks", "cli"}
# What each package must not import; utils must not import any other subpackage.
FORBIDDEN = {
    "data": HIGH_LEVEL,
    "models": HIGH_LEVEL,
    "metrics": HIGH_LEVEL,
    "callbacks": HIGH_LEVEL,
    "analysis": HIGH_LEVEL,
    "inference": HIGH_LEVEL - {"inference"},
}
# Modules (or every module of a subpackage, but the listed exceptions) that must not import a subpackage.
MODULE_FORBIDDEN = {
    "metricsearch.pipelines.evaluate": {"search"},
    "metricsearch.pipelines.export": {"search"},
    "metricsearch.cli.evaluate": {"search"},
}
# The benchmarks of the search service itself (the index's speed, the server under load) may import it.
SEARCH_BENCHMARKS = {
    "metricsearch.benchmarks.search",
    "metricsearch.benchmarks.search_backends",
    "metricsearch.benchmarks.load_test",
}


def imported_subpackages(source: str, module: str) -> set[str]:
    """The ``metricsearch`` subpackages a module's source imports (absolute or relative, anywhere in the file).

    Args:
        source: The module's Python source.
        module: Its dotted name (``metricsearch.data.io``), to resolve relative imports.
    """
    found = set()
    package_parts = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
            elif node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "metricsearch" and len(parts) > 1:
                found.add(parts[1])
    return found


def package_modules() -> list[tuple[str, str, Path]]:
    """(subpackage, dotted module name, path) of every module inside a subpackage."""
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        if len(parts) < 3:  # metricsearch/__init__.py and modules at the package root belong to no layer
            continue
        modules.append((parts[1], ".".join(parts), path))
    return modules


def violations() -> list[str]:
    found = []
    for subpackage, module, path in package_modules():
        imported = imported_subpackages(path.read_text(), module) - {subpackage}
        bad = imported if subpackage == "utils" else imported & FORBIDDEN.get(subpackage, set())
        bad |= imported & MODULE_FORBIDDEN.get(module, set())
        if subpackage == "benchmarks" and module not in SEARCH_BENCHMARKS:
            bad |= imported & {"search"}
        found += [f"{path.relative_to(PACKAGE.parent)} imports metricsearch.{name}" for name in sorted(bad)]
    return found


def test_low_level_packages_never_import_high_level_ones():
    assert violations() == []


def test_the_module_rules_name_modules_that_exist():
    # A renamed module would otherwise leave its rule checking nothing.
    modules = {module for _, module, _ in package_modules()}
    assert set(MODULE_FORBIDDEN) | SEARCH_BENCHMARKS <= modules


def test_the_layers_cover_the_package():
    # A new subpackage must be placed in a layer (or be high-level): the list is checked, not assumed.
    subpackages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert subpackages <= set(FORBIDDEN) | HIGH_LEVEL | {"utils"}, subpackages


@pytest.mark.parametrize(
    "source, module, expected",
    [
        ("import metricsearch.search.index", "metricsearch.data.io", {"search"}),
        ("from metricsearch.pipelines import train", "metricsearch.models.head", {"pipelines"}),
        ("def f():\n    from metricsearch.cli import main\n", "metricsearch.metrics.x", {"cli"}),  # a late import
        ("from ..search import server", "metricsearch.data.io", {"search"}),
        ("from .. import search", "metricsearch.data.io", {"search"}),
        ("from . import cache", "metricsearch.data.io", {"data"}),
        ("import numpy\nfrom metricsearch import utils", "metricsearch.data.io", {"utils"}),
    ],
)
def test_the_import_reader_sees_every_form_of_import(source, module, expected):
    assert imported_subpackages(source, module) == expected
