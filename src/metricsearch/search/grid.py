"""A PNG picture of a search: the query on the left, its ranked results with scores on the right."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from metricsearch.data.io import ImageLoadError, load_rgb_image
from metricsearch.search.index import Hit
from metricsearch.utils.atomic_io import atomic_path
from metricsearch.utils.paths import resolves_inside

BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (238, 238, 238)
TEXT = (30, 30, 30)
QUERY_BORDER = (40, 90, 200)
# Result borders: same class as the query, another class, or unknown.
MATCH_BORDER = (30, 150, 60)
MISMATCH_BORDER = (200, 50, 40)
UNKNOWN_BORDER = (160, 160, 160)
BORDER = 4
GAP = 10
CAPTION_LINES = 3


def _fit(image: Image.Image, size: int) -> Image.Image:
    """``image`` scaled to fit a ``size`` square, centred on a neutral background (aspect ratio kept)."""
    scale = size / max(image.size)
    resized = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    tile = Image.new("RGB", (size, size), TILE_BACKGROUND)
    tile.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return tile


def _shorten(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` cut from the left with an ellipsis until it fits ``width`` pixels (the file name matters most)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength("…" + text) > width:
        text = text[1:]
    return "…" + text


def save_result_grid(
    query: Image.Image,
    hits: Sequence[Hit],
    load_result: Callable[[Hit], Image.Image],
    out_path: str | Path,
    query_label: str | None = None,
    query_caption: str = "query",
    title: str | None = None,
    tile_size: int = 160,
    columns: int = 5,
) -> Path:
    """Draws the query and its results as a PNG, written atomically.

    Args:
        query: the query image.
        hits: the results, best first.
        load_result: reads the image of a result (e.g. from the index's gallery root).
        out_path: the PNG file.
        query_label: the query's class, if known: results of the same class get a green frame, others red.
        query_caption: text under the query (e.g. its file name).
        title: a line above everything (e.g. which model and index).
        tile_size: side of each thumbnail in pixels.
        columns: results per row.

    Returns:
        The written file.
    """
    font = ImageFont.load_default(size=max(10, tile_size // 12))
    line_height = int(font.size * 1.3)
    cell_w = tile_size + 2 * BORDER
    cell_h = cell_w + CAPTION_LINES * line_height + GAP
    columns = max(1, min(columns, len(hits) or 1))
    rows = max(1, math.ceil(len(hits) / columns))
    header = line_height + GAP if title else 0
    width = GAP + cell_w + 3 * GAP + columns * (cell_w + GAP)
    height = GAP + header + rows * cell_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, GAP), _shorten(title, font, width - 2 * GAP), fill=TEXT, font=font)

    def place(image: Image.Image, x: int, y: int, border: tuple[int, int, int], lines: list[str]) -> None:
        draw.rectangle([x, y, x + cell_w - 1, y + cell_w - 1], fill=border)
        canvas.paste(_fit(image, tile_size), (x + BORDER, y + BORDER))
        for i, line in enumerate(lines[:CAPTION_LINES]):
            draw.text((x, y + cell_w + 2 + i * line_height), _shorten(line, font, cell_w), fill=TEXT, font=font)

    top = GAP + header
    query_lines = [query_caption] + ([query_label] if query_label is not None else [])
    place(query, GAP, top, QUERY_BORDER, query_lines)
    left = GAP + cell_w + 3 * GAP
    for i, hit in enumerate(hits):
        try:
            image = load_result(hit)
        except ImageLoadError:
            image = Image.new("RGB", (tile_size, tile_size), TILE_BACKGROUND)
        if query_label is None or hit.label is None:
            border = UNKNOWN_BORDER
        else:
            border = MATCH_BORDER if hit.label == query_label else MISMATCH_BORDER
        lines = [f"#{hit.rank}  score {hit.score:.3f}", *([] if hit.label is None else [hit.label]), hit.path]
        row, col = divmod(i, columns)
        place(image, left + col * (cell_w + GAP), top + row * cell_h, border, lines)

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        canvas.save(tmp, format="PNG")
    return out_path


def gallery_loader(gallery_root: str | Path) -> Callable[[Hit], Image.Image]:
    """A ``load_result`` for :func:`save_result_grid` that reads results from the gallery folder (only files that
    lie inside it, links followed: a result that leads elsewhere is drawn as an empty tile)."""
    root = Path(gallery_root)

    def load(hit: Hit) -> Image.Image:
        if not resolves_inside(root, root / hit.path):
            raise ImageLoadError(f"{hit.path} leads outside the gallery {root}; it is not shown")
        return load_rgb_image(root / hit.path)

    return load
