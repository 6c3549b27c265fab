"""Writing figures, images and tables through the project's atomic writers (no half-written file is ever seen)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

from metricsearch.utils.atomic_io import atomic_path, atomic_write_text


def save_figure(figure: Any, path: str | os.PathLike[str], dpi: int = 100) -> None:
    """Saves a matplotlib Figure as PNG (or the format of ``path``'s suffix) atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi)


def save_image(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """Saves a PIL image atomically, in the format of ``path``'s suffix."""
    with atomic_path(path) as tmp:
        image.save(tmp)


def write_csv(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """Writes dict rows as CSV atomically; columns default to the keys of the first row, in order."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0]) if rows else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Reads a CSV file written by :func:`write_csv` into dict rows (values as strings)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
