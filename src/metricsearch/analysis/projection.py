"""2-D maps of an embedding space: a capped sample, projected with UMAP (McInnes et al. 2018) or PCA, and drawn.

UMAP shows the neighbourhood structure retrieval depends on, but it needs a neighbour graph of a few hundred points
to mean anything and compiles its numba kernels on first use (10-20 s per process). PCA is instant and exact, so
it is the fallback for small sets and the cheap option for frequent drawing.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

ProjectionMethod = Literal["umap", "pca"]
# Below this many points UMAP's 15-neighbour graph covers most of the set and the map says little: use PCA.
UMAP_MIN_POINTS = 100


def sample_evenly(num_items: int, max_items: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most ``max_items`` of ``num_items`` items, drawn without replacement.

    The same ``seed`` gives the same sample for the same set, so maps of successive epochs show the same points.

    Args:
        num_items: Size of the set to sample from.
        max_items: Cap on the sample size; 0 or less means no cap.
        seed: Seed of the draw.

    Returns:
        Int64 array of positions in increasing order.

    Example:
        >>> sample_evenly(5, 10).tolist()
        [0, 1, 2, 3, 4]
        >>> len(sample_evenly(1000, 10))
        10
    """
    if max_items <= 0 or num_items <= max_items:
        return np.arange(num_items, dtype=np.int64)
    chosen = np.random.default_rng(seed).choice(num_items, size=max_items, replace=False)
    return np.sort(chosen).astype(np.int64)


def project_to_2d(
    embeddings: np.ndarray,
    method: ProjectionMethod = "umap",
    seed: int = 0,
    *,
    umap_min_points: int = UMAP_MIN_POINTS,
    n_neighbors: int = 15,
) -> tuple[np.ndarray, str]:
    """Projects embeddings to 2-D.

    Args:
        embeddings: Array of shape (N, D), N >= 2.
        method: ``umap`` (cosine metric, as retrieval compares normalised embeddings) or ``pca``.
        seed: Seed of UMAP's layout; the same seed and data give the same map.
        umap_min_points: Smaller sets get PCA even when UMAP is asked for.
        n_neighbors: UMAP's neighbourhood size, clipped to N - 1.

    Returns:
        The (N, 2) float32 coordinates and the name of the method actually used (``umap`` or ``pca``).

    Raises:
        ValueError: On an unknown method or fewer than two points.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if method not in ("umap", "pca"):
        raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need an (N, D) array with N >= 2, got shape {x.shape}")
    if method == "umap" and len(x) >= umap_min_points:
        try:
            # Imported here: numba makes the import slow, and only a UMAP needs it.
            import umap
        except ImportError:
            log.warning("umap-learn is not installed; drawing a PCA map instead")
        else:
            reducer = umap.UMAP(
                n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), metric="cosine", random_state=seed
            )
            with warnings.catch_warnings():
                # A fixed random_state makes UMAP single-threaded, and it warns about that on every call.
                warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*", category=UserWarning)
                return reducer.fit_transform(x).astype(np.float32), "umap"
    return _pca_2d(x), "pca"


def _pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components (zero-padded when the data has fewer than two dimensions of spread)."""
    centred = x - x.mean(axis=0, keepdims=True)
    # SVD of the centred data: the right singular vectors are the principal axes.
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ axes[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords.astype(np.float32)


def plot_projection(
    coords: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    title: str = "",
    *,
    method: str = "umap",
    ax: Axes | None = None,
) -> Figure:
    """Scatter of 2-D coordinates coloured by class.

    With tens or hundreds of classes no legend can name them: colours cycle through 10 (or, with more than ten
    classes, 20) hues, so two clusters of one colour may be different classes. What the map shows is whether
    classes form tight, separated clusters.

    Args:
        coords: Array of shape (N, 2).
        labels: The class of each point.
        title: Figure title.
        method: The projection's name, for the axis labels.
        ax: Draw into this Axes instead of a new figure.

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.figure import Figure

    coords = np.asarray(coords)
    labels = np.asarray(labels)
    if ax is None:
        # NOTE: a bare Figure (no pyplot) leaves the global backend and figure registry alone, so drawing from a
        # training callback neither leaks figures nor changes how a notebook displays its own.
        fig = Figure(figsize=(6.5, 6), dpi=100)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    classes, colour_index = np.unique(labels, return_inverse=True)
    # tab10's hues are the most distinct; tab20 (pairs of light and dark hues) only when there are more classes.
    palette = 10 if len(classes) <= 10 else 20
    ax.scatter(
        coords[:, 0],
        coords[:, 1],
        c=colour_index % palette,
        cmap=f"tab{palette}",
        vmin=0,
        vmax=palette - 1,
        s=12,
        alpha=0.85,
        linewidths=0,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(title or f"{len(coords)} embeddings, {len(classes)} classes", fontsize=10)
    fig.tight_layout()
    return fig


def projection_rows(
    coords: np.ndarray,
    embeddings: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    paths: Sequence[str] | None = None,
    *,
    method: str = "umap",
    decimals: int = 5,
) -> list[dict[str, object]]:
    """The projected sample as table rows: dataset index, label, image path, 2-D coordinates, embedding columns.

    The embedding columns (``e0``, ``e1``, ...) are what the W&B embedding projector reads; ``x`` and ``y`` are the
    coordinates this run drew, so a notebook can redraw the map without recomputing it.
    """
    rows = []
    for i in range(len(coords)):
        row: dict[str, object] = {
            "index": int(indices[i]),
            "label": int(labels[i]),
            "path": "" if paths is None else str(paths[int(indices[i])]),
            "method": method,
            "x": round(float(coords[i, 0]), decimals),
            "y": round(float(coords[i, 1]), decimals),
        }
        row.update({f"e{d}": round(float(v), decimals) for d, v in enumerate(embeddings[i])})
        rows.append(row)
    return rows


def read_projection_table(rows: Sequence[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, str]:
    """Coordinates, labels and method name from rows of a projection CSV (see :func:`projection_rows`)."""
    coords = np.array([[float(r["x"]), float(r["y"])] for r in rows], dtype=np.float32).reshape(-1, 2)
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    method = rows[0].get("method", "umap") if rows else "umap"
    return coords, labels, method
