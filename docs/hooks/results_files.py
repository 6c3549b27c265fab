"""mkdocs hook: the pictures of ``results/`` (the recall plot, the interval plot, ...) become site files.

The results stay where ``make reproduce`` and ``make compare`` write them; pages link them as ``results/...``
(relative to the docs folder), and a strict build fails when a linked picture is missing.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "results"
PICTURES = ("*.png", "*.svg")


def on_files(files, config):
    for pattern in PICTURES:
        for path in sorted(RESULTS.rglob(pattern)):
            if {"runs", "search", "final"} & set(path.relative_to(RESULTS).parts):
                continue
            uri = "results/" + path.relative_to(RESULTS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
