"""Retrieval examples: a fixed set of queries, their top-k neighbours, and a grid image marking right and wrong.

Queries are chosen from the labels alone, with a seeded generator, so every epoch of a run shows the same queries
and the grids of successive epochs can be compared side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from metricsearch.data.io import load_rgb_image

# Border colours of the grid: the query, a neighbour of the query's class, a neighbour of another class.
QUERY_COLOUR = (70, 110, 200)
CORRECT_COLOUR = (40, 170, 60)
WRONG_COLOUR = (210, 40, 40)


@dataclass(frozen=True)
class RetrievalExamples:
    """The top-k neighbours of a few queries, all given as dataset indices (positions in the split's records).

    Attributes:
        query_indices: Shape (Q,).
        query_labels: Shape (Q,).
        neighbor_indices: Shape (Q, k), nearest first; the query itself is never among them.
        neighbor_labels: Shape (Q, k).
        scores: Shape (Q, k), cosine similarities.
    """

    query_indices: np.ndarray
    query_labels: np.ndarray
    neighbor_indices: np.ndarray
    neighbor_labels: np.ndarray
    scores: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        """Shape (Q, k): whether each neighbour is of the query's class."""
        return self.neighbor_labels == self.query_labels[:, None]


def choose_queries(labels: np.ndarray, num_queries: int, seed: int = 0, *, min_class_size: int = 2) -> np.ndarray:
    """Positions of ``num_queries`` queries of distinct classes (classes repeat only when there are too few).

    Only classes with at least ``min_class_size`` items are eligible: in a self-search a singleton class has
    nothing to retrieve (queries searched in a separate gallery pass 1, having been filtered by the caller).

    Args:
        labels: Shape (N,), the class of every item of the evaluation set.
        num_queries: How many queries to pick.
        seed: Seed of the choice; the same labels and seed give the same queries.
        min_class_size: Smallest class that may give a query.

    Returns:
        Sorted int64 positions into ``labels``.

    Example:
        >>> choose_queries(np.array([0, 0, 1, 1, 2]), num_queries=2, seed=0).shape
        (2,)
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= min_class_size]
    if len(eligible) == 0 or num_queries <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    picked_classes = rng.permutation(eligible)
    if num_queries > len(eligible):
        picked_classes = np.concatenate([picked_classes, rng.choice(eligible, num_queries - len(eligible))])
    chosen: list[int] = []
    for cls in picked_classes[:num_queries]:
        members = np.flatnonzero(labels == cls)
        members = members[~np.isin(members, chosen)]
        if len(members):
            chosen.append(int(rng.choice(members)))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def find_retrieval_examples(
    embeddings: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray | None = None,
    *,
    num_queries: int = 8,
    k: int = 5,
    seed: int = 0,
    query_count: int | None = None,
) -> RetrievalExamples:
    """Searches the whole set (minus each query, by position) for the neighbours of a few fixed queries.

    Only the chosen queries are searched, so this stays cheap on large evaluation sets. With ``query_count``
    (the query/gallery protocol) the rows whose dataset index is below it are the queries and the others the
    gallery: queries are chosen among those whose class is in the gallery and searched in the gallery only.

    Args:
        embeddings: Shape (N, D), L2-normalised (inner product = cosine similarity).
        labels: Shape (N,).
        indices: Shape (N,), the dataset index of each row (``CollectedEmbeddings.indices``); None when rows are
            already in dataset order.
        num_queries: Number of queries.
        k: Neighbours per query, clipped to N - 1.
        seed: Seed of the query choice.
        query_count: None for a self-search; else the number of queries that come first in dataset order.

    Returns:
        The examples, with dataset indices.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    indices = np.arange(len(x)) if indices is None else np.asarray(indices)
    if query_count is None:
        queries = choose_queries(labels, num_queries, seed)
        gallery = np.arange(len(x))
        k = max(0, min(k, len(x) - 1))
    else:
        gallery = np.flatnonzero(indices >= query_count)
        candidates = np.flatnonzero((indices < query_count) & np.isin(labels, labels[gallery]))
        queries = candidates[choose_queries(labels[candidates], num_queries, seed, min_class_size=1)]
        k = max(0, min(k, len(gallery)))
    similarities = x[queries] @ x[gallery].T
    if query_count is None:
        # The query is excluded by position (not "drop the first column"), which stays right with duplicate images.
        similarities[np.arange(len(queries)), queries] = -np.inf
    # Sort by decreasing similarity, ties by increasing position, so the result does not depend on BLAS rounding
    # order between equal scores.
    positions = np.broadcast_to(np.arange(len(gallery)), similarities.shape)
    order = np.lexsort((positions, -similarities), axis=-1)[:, :k]
    scores = np.take_along_axis(similarities, order, axis=1)
    return RetrievalExamples(
        query_indices=indices[queries],
        query_labels=labels[queries],
        neighbor_indices=indices[gallery][order],
        neighbor_labels=labels[gallery][order],
        scores=scores.astype(np.float32),
    )


def retrieval_rows(examples: RetrievalExamples, paths: Sequence[str | Path]) -> list[dict[str, object]]:
    """The examples as a long table: one row per (query, rank), with image paths, for CSV files.

    Args:
        examples: The examples.
        paths: Image path of every dataset index of the split.

    Returns:
        Rows with keys query, query_label, query_path, rank (1-based), neighbor, neighbor_label, neighbor_path,
        score and correct.
    """
    rows = []
    correct = examples.correct
    for q, query in enumerate(examples.query_indices):
        for r, neighbor in enumerate(examples.neighbor_indices[q]):
            rows.append(
                {
                    "query": int(query),
                    "query_label": int(examples.query_labels[q]),
                    "query_path": str(paths[int(query)]),
                    "rank": r + 1,
                    "neighbor": int(neighbor),
                    "neighbor_label": int(examples.neighbor_labels[q, r]),
                    "neighbor_path": str(paths[int(neighbor)]),
                    "score": round(float(examples.scores[q, r]), 5),
                    "correct": bool(correct[q, r]),
                }
            )
    return rows


def load_thumbnail(path: str | Path, size: int = 64) -> Image.Image:
    """The image at ``path`` centre-cropped and resized to a ``size`` x ``size`` RGB square."""
    return ImageOps.fit(load_rgb_image(path), (size, size), method=Image.Resampling.BILINEAR)


def fit_caption(name: str, font: ImageFont.ImageFont, width: float, prefix: str = "", suffix: str = "") -> str:
    """``prefix + name + suffix`` in at most ``width`` pixels of ``font``: the prefix is dropped first, then the
    middle of the name is replaced by "…" (its start and end usually tell classes apart: ``shape1…42``), down to one
    character on each side.

    Example:
        >>> font = ImageFont.load_default(size=10)
        >>> fit_caption("cat", font, 200, "query: ")
        'query: cat'
        >>> fit_caption("001.Black_footed_Albatross", font, 60)
        '001.Bl…atross'
    """
    if font.getlength(prefix + name + suffix) <= width:
        return prefix + name + suffix
    head, tail = len(name) // 2, len(name) - len(name) // 2
    text = name
    while font.getlength(text + suffix) > width and head + tail > 2:
        if head >= tail:
            head -= 1
        else:
            tail -= 1
        text = name[:head] + "…" + name[len(name) - tail :]
    return text + suffix


def draw_retrieval_grid(
    examples: RetrievalExamples,
    paths: Sequence[str | Path] | Mapping[int, str | Path],
    *,
    thumbnail_size: int = 64,
    border: int = 4,
    title: str = "",
    class_names: Mapping[int, str] | None = None,
) -> Image.Image:
    """Draws one row per query: the query (blue frame), then its neighbours framed green (same class) or red.

    Each tile is captioned with its class (its name from ``class_names``, shortened to the tile, or its id ``c12``);
    neighbours also with their cosine similarity.

    Args:
        examples: The examples to draw.
        paths: Image path of every dataset index of the split (a sequence, or a mapping holding at least the
            indices drawn).
        thumbnail_size: Side of each image in pixels.
        border: Frame width in pixels.
        title: A line of text above the grid.
        class_names: Class id -> name (the folder's class names); ids without a name are drawn as ``c<id>``.

    Returns:
        The grid as an RGB image.
    """
    num_queries, k = examples.neighbor_indices.shape if examples.neighbor_indices.ndim == 2 else (0, 0)
    font = ImageFont.load_default(size=max(9, thumbnail_size // 6))
    caption_height = font.size + 4
    tile_w = thumbnail_size + 2 * border
    tile_h = tile_w + caption_height
    gap = tile_w // 3  # separates the query column from its results
    title_height = caption_height + 4 if title else 0
    width = max(tile_w * (k + 1) + gap, 1)
    height = max(title_height + tile_h * num_queries, 1)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)

    thumbnails: dict[int, Image.Image] = {}
    names = class_names or {}

    def caption_of(label: int, prefix: str = "", suffix: str = "") -> str:
        return fit_caption(str(names.get(label, f"c{label}")), font, tile_w - 4, prefix, suffix)

    def tile(index: int, x: int, y: int, colour: tuple[int, int, int], caption: str) -> None:
        if index not in thumbnails:
            thumbnails[index] = load_thumbnail(paths[index], thumbnail_size)
        draw.rectangle([x, y, x + tile_w - 1, y + tile_w - 1], fill=colour)
        grid.paste(thumbnails[index], (x + border, y + border))
        draw.text((x + 2, y + tile_w + 1), caption, fill=(0, 0, 0), font=font)

    correct = examples.correct
    for q in range(num_queries):
        y = title_height + q * tile_h
        tile(int(examples.query_indices[q]), 0, y, QUERY_COLOUR, caption_of(int(examples.query_labels[q]), "query: "))
        for r in range(k):
            colour = CORRECT_COLOUR if correct[q, r] else WRONG_COLOUR
            caption = caption_of(int(examples.neighbor_labels[q, r]), suffix=f"  {examples.scores[q, r]:.2f}")
            tile(int(examples.neighbor_indices[q, r]), tile_w + gap + r * tile_w, y, colour, caption)
    return grid
