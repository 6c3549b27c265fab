"""The neighbour confusion matrix: which classes the nearest neighbours of each class's images belong to.

The CIFAR-10 image-similarity example (Keras, "Metric learning for image similarity search") ends with it: take
the first ``per_class`` evaluation images of every class as queries, find each one's ``k`` nearest neighbours, and
count row = the query's class, column = the neighbour's class. A perfect embedding puts every count on the diagonal;
off-diagonal mass shows which classes the model confuses (cats with dogs, cars with trucks). It is readable up to
about 50 classes, which is why the visualization callback draws it only for evaluations with at most that many.

Queries are searched like the metrics search them: in the whole set minus the query itself (self-search), or in
the gallery only (``query_count``: rows whose dataset index is below it are queries). Equal scores are ordered by
increasing position, as everywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

__all__ = ["NeighbourConfusion", "confusion_rows", "neighbour_confusion", "plot_neighbour_confusion"]


@dataclass(frozen=True)
class NeighbourConfusion:
    """Counts of neighbour classes per query class.

    Attributes:
        classes: Shape (C,), the class ids of the rows and columns, sorted.
        counts: Shape (C, C), int64: ``counts[i, j]`` neighbours of class ``classes[j]`` among the neighbours of
            the queries of class ``classes[i]``.
        queries_per_class: Shape (C,), how many queries each row summed over.
        k: Neighbours per query.
    """

    classes: np.ndarray
    counts: np.ndarray
    queries_per_class: np.ndarray
    k: int

    @property
    def fractions(self) -> np.ndarray:
        """The counts divided by their row sums (rows without queries stay 0)."""
        totals = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)

    @property
    def accuracy(self) -> float:
        """The fraction of all neighbours counted that are of their query's class (the diagonal's share)."""
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else 0.0


def neighbour_confusion(
    embeddings: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray | None = None,
    *,
    per_class: int = 10,
    k: int = 10,
    query_count: int | None = None,
) -> NeighbourConfusion:
    """Counts the classes of the ``k`` nearest neighbours of the first ``per_class`` images of every class.

    Args:
        embeddings: Shape (N, D), L2-normalised (inner product = cosine similarity).
        labels: Shape (N,).
        indices: Shape (N,), each row's dataset index; "first" images are those of smallest index. None: rows
            are in dataset order.
        per_class: Queries per class (fewer where a class has fewer images).
        k: Neighbours per query, clipped to the number of candidates.
        query_count: None to search the whole set minus the query; else rows with dataset index below it are
            the queries (rows and columns: the classes of queries and gallery) and the others the gallery.

    Returns:
        The counts.

    Raises:
        ValueError: Mismatched shapes, ``per_class`` or ``k`` below 1, or no gallery to search.

    Example:
        >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], dtype=np.float32)
        >>> neighbour_confusion(x, np.array([0, 0, 1, 1]), per_class=2, k=1).counts.tolist()
        [[2, 0], [0, 2]]
    """
    x = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    indices = np.arange(len(x)) if indices is None else np.asarray(indices).reshape(-1)
    if x.ndim != 2 or len(labels) != len(x) or len(indices) != len(x):
        raise ValueError(
            f"embeddings must be (N, D) with N labels and N indices; got {x.shape}, {labels.shape}, {indices.shape}"
        )
    if per_class < 1 or k < 1:
        raise ValueError(f"per_class and k must be at least 1, got {per_class} and {k}")
    order = np.argsort(indices, kind="stable")
    x, labels, indices = x[order], labels[order], indices[order]
    is_query = np.ones(len(x), dtype=bool) if query_count is None else indices < query_count
    gallery = np.arange(len(x)) if query_count is None else np.flatnonzero(~is_query)
    if len(gallery) == 0 or (query_count is None and len(x) < 2):
        raise ValueError("the neighbour confusion matrix needs at least one other image to search")
    classes = np.unique(labels)
    queries = np.concatenate(
        [np.flatnonzero(is_query & (labels == c))[:per_class] for c in classes] or [np.zeros(0, dtype=np.int64)]
    )
    similarities = x[queries] @ x[gallery].T
    if query_count is None:
        # Self-search: the query is not its own neighbour (excluded by position, right with duplicate images too).
        similarities[np.arange(len(queries)), queries] = -np.inf
    k = min(k, len(gallery) - (1 if query_count is None else 0))
    positions = np.broadcast_to(np.arange(len(gallery)), similarities.shape)
    nearest = np.lexsort((positions, -similarities), axis=-1)[:, :k]
    row = np.searchsorted(classes, labels[queries])
    column = np.searchsorted(classes, labels[gallery][nearest])
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(counts, (np.repeat(row, k), column.reshape(-1)), 1)
    queries_per_class = np.bincount(row, minlength=len(classes)).astype(np.int64)
    return NeighbourConfusion(classes, counts, queries_per_class, k)


def plot_neighbour_confusion(
    confusion: NeighbourConfusion, class_names: Mapping[int, str] | None = None, title: str = ""
) -> Figure:
    """Draws the row-normalised matrix as a heat map (counts written in the cells when there are at most 20 classes)."""
    names = [str((class_names or {}).get(int(c), int(c))) for c in confusion.classes]
    size = len(names)
    side = min(16.0, 3.0 + 0.32 * size)
    figure = Figure(figsize=(side + 1.5, side))
    axes = figure.add_subplot()
    image = axes.imshow(confusion.fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the row's neighbours")
    ticks = np.arange(size)
    font = 8 if size <= 20 else 6
    axes.set_xticks(ticks, names, rotation=90, fontsize=font)
    axes.set_yticks(ticks, names, fontsize=font)
    axes.set_xlabel(f"class of the neighbour ({confusion.k} per query)")
    axes.set_ylabel("class of the query")
    if size <= 20:
        fractions = confusion.fractions
        for i in range(size):
            for j in range(size):
                if confusion.counts[i, j]:
                    colour = "white" if fractions[i, j] > 0.5 else "black"
                    axes.text(j, i, int(confusion.counts[i, j]), ha="center", va="center", fontsize=font, color=colour)
    heading = title or "Neighbour confusion matrix"
    axes.set_title(f"{heading}\n{100 * confusion.accuracy:.1f}% of neighbours share the query's class", fontsize=10)
    figure.tight_layout()
    return figure


def confusion_rows(confusion: NeighbourConfusion, class_names: Mapping[int, str] | None = None) -> list[dict]:
    """The matrix as a long table (query class, neighbour class, count, fraction) for CSV files."""
    names = class_names or {}
    fractions = confusion.fractions
    return [
        {
            "query_class": int(a),
            "query_name": names.get(int(a), ""),
            "neighbour_class": int(b),
            "neighbour_name": names.get(int(b), ""),
            "count": int(confusion.counts[i, j]),
            "fraction": round(float(fractions[i, j]), 5),
        }
        for i, a in enumerate(confusion.classes)
        for j, b in enumerate(confusion.classes)
    ]
