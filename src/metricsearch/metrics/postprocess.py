"""Post-processing after the embedding: query expansion, database-side augmentation, k-reciprocal re-ranking.

- alpha-weighted query expansion (alpha-QE; Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human
  Annotation", TPAMI 2018): each query becomes the normalised sum of itself and its k nearest gallery items,
  each weighted by its similarity to the query to the power alpha.
- Database-side augmentation (DBA; same paper, after Arandjelovic and Zisserman 2012): every gallery item is
  replaced the same way by the weighted sum of itself and its k nearest gallery items.
- k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
  CVPR 2017): the distance becomes ``(1 - lambda) * Jaccard + lambda * original``, where the Jaccard distance
  compares the (expanded, Gaussian-weighted) k-reciprocal neighbourhoods of the two items in the joint set of
  queries and gallery. Each item's neighbourhood vector is sparse (about k1 entries), so no (N + G)^2 matrix is
  held: the Jaccard terms are accumulated through an inverted index, and a block of queries at a time is scored.

All three work on L2-normalised embeddings; without a separate gallery the queries are the gallery and each query
is excluded from its own neighbours by index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp

from metricsearch.metrics.positive_ranks import PositiveRanks
from metricsearch.metrics.retrieval import calc_metrics_from_positive_ranks, calc_retrieval_metrics, count_relevant

__all__ = [
    "POSTPROCESS_METHODS",
    "KReciprocalParams",
    "PostprocessSettings",
    "augment_database",
    "calc_postprocessed_metrics",
    "expand_queries",
    "k_reciprocal_scores",
    "normalize_rows",
    "rank_positives_from_scores",
]

POSTPROCESS_METHODS = ("none", "aqe", "dba", "k_reciprocal")


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalises every row (rows of zeros stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _top_k(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (faiss), the query's own index dropped when the queries are the gallery."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    extra = 1 if exclude_self else 0
    scores, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k + extra, len(gallery)))
    if not exclude_self:
        return scores, indices
    keep = indices != np.arange(len(queries))[:, None]
    # Rows where the query itself was not returned (an exact copy outranked it) keep their first k.
    keep &= np.cumsum(keep, axis=1) <= k
    width = min(k, len(gallery) - 1)
    return scores[keep].reshape(len(queries), width), indices[keep].reshape(len(queries), width)


def _weighted_expansion(items: np.ndarray, gallery: np.ndarray, k: int, alpha: float, exclude_self: bool) -> np.ndarray:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if alpha < 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}")
    scores, indices = _top_k(items, gallery, k, exclude_self)
    weights = np.maximum(scores, 0.0) ** alpha
    expanded = items.astype(np.float64) + np.einsum("nk,nkd->nd", weights, gallery[indices].astype(np.float64))
    return normalize_rows(expanded)


def expand_queries(
    queries: np.ndarray, gallery: np.ndarray | None = None, k: int = 2, alpha: float = 3.0
) -> np.ndarray:
    """alpha-QE: ``normalise(q + sum_i max(s_i, 0)^alpha * g_i)`` over the query's k nearest gallery items.

    Args:
        queries: (N, D) L2-normalised queries.
        gallery: (G, D) L2-normalised gallery, or None when the queries are the gallery (then a query's own row
            is not among its neighbours).
        k: Neighbours added to each query.
        alpha: Exponent of the similarity weights (0: plain average query expansion).

    Returns:
        (N, D) float32 expanded, L2-normalised queries.
    """
    return _weighted_expansion(queries, queries if gallery is None else gallery, k, alpha, gallery is None)


def augment_database(gallery: np.ndarray, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """DBA: every gallery item replaced by ``normalise(g + sum_i max(s_i, 0)^alpha * g_i)`` over its k nearest
    other gallery items. Returns (G, D) float32."""
    return _weighted_expansion(gallery, gallery, k, alpha, exclude_self=True)


@dataclass(frozen=True)
class KReciprocalParams:
    """The published defaults of k-reciprocal re-ranking: k1 = 20, k2 = 6, lambda = 0.3."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        if self.k1 < 1 or self.k2 < 1:
            raise ValueError(f"k1 and k2 must be at least 1, got k1={self.k1}, k2={self.k2}")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise ValueError(f"lambda must lie in [0, 1], got {self.lambda_value}")


def _row_max_distance(x: np.ndarray, block_rows: int = 4096) -> np.ndarray:
    """Each row's largest squared Euclidean distance to any item: 2 - 2 * (its lowest inner product)."""
    lowest = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), block_rows):
        lowest[start : start + block_rows] = (x[start : start + block_rows] @ x.T).min(axis=1)
    return np.maximum(2.0 - 2.0 * lowest, 1e-12)


def _neighbourhood_vectors(x: np.ndarray, params: KReciprocalParams) -> tuple[sp.csr_matrix, np.ndarray]:
    """The sparse k-reciprocal encoding V of every item of the joint set, with local query expansion over k2.

    Returns:
        ``(V, row_max)``: V as a CSR matrix (M x M, rows sum to 1) and each row's largest distance, by which the
        original distances are normalised (as in the paper's code).
    """
    num_items = len(x)
    k1 = min(params.k1, num_items - 1)
    half = min(int(np.around(params.k1 / 2)), num_items - 1)
    row_max = _row_max_distance(x)
    # The k1 + 1 nearest including the item itself, ordered by distance then index.
    _, ranked = _top_k(x, x, k1, exclude_self=True)
    forward = np.concatenate([np.arange(num_items)[:, None], ranked], axis=1)
    forward_sets = [set(row) for row in forward.tolist()]
    half_sets = [set(row[: half + 1]) for row in forward.tolist()]

    def reciprocal(item: int, width: int, sets: list[set[int]]) -> np.ndarray:
        candidates = forward[item, : width + 1]
        return np.array([c for c in candidates.tolist() if item in sets[c]], dtype=np.int64)

    rows, cols, values = [], [], []
    for item in range(num_items):
        members = reciprocal(item, k1, forward_sets)
        expanded = set(members.tolist())
        for candidate in members.tolist():
            candidate_set = reciprocal(candidate, half, half_sets)
            if len(np.intersect1d(candidate_set, members)) > 2 / 3 * len(candidate_set):
                expanded.update(candidate_set.tolist())
        neighbours = np.array(sorted(expanded), dtype=np.int64)
        distance = (2.0 - 2.0 * (x[neighbours] @ x[item])) / row_max[item]
        weights = np.exp(-distance)
        rows.append(np.full(len(neighbours), item))
        cols.append(neighbours)
        values.append(weights / weights.sum())
    v = sp.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(num_items, num_items)
    )
    if params.k2 > 1:
        k2 = min(params.k2, num_items)
        # Local query expansion: the mean of the encodings of the item's k2 nearest (itself first).
        expansion = sp.csr_matrix(
            (np.full(num_items * k2, 1.0 / k2), (np.repeat(np.arange(num_items), k2), forward[:, :k2].ravel())),
            shape=(num_items, num_items),
        )
        v = (expansion @ v).tocsr()
    return v, row_max


def k_reciprocal_scores(
    queries: np.ndarray,
    gallery: np.ndarray | None = None,
    params: KReciprocalParams | None = None,
    block_rows: int = 1024,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yields blocks of re-ranked scores (higher is closer: the negated final distance) of queries x gallery.

    Args:
        queries: (N, D) L2-normalised queries.
        gallery: (G, D) L2-normalised gallery, or None when the queries are the gallery; then each query's own
            column is set to -inf.
        params: k1, k2 and lambda (default: the paper's 20, 6, 0.3).
        block_rows: Queries scored at once.

    Yields:
        ``(rows, scores)``: the query rows of the block and a (len(rows), G) float64 matrix.
    """
    params = params or KReciprocalParams()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    joint = queries if gallery is None else np.concatenate([queries, np.asarray(gallery, dtype=np.float32)])
    num_queries = len(queries)
    gallery_offset = 0 if gallery is None else num_queries
    num_gallery = len(joint) - gallery_offset
    v, row_max = _neighbourhood_vectors(joint, params)
    v_gallery = v[gallery_offset:].tocsc()  # gallery encodings, read column by column (inverted index)
    gallery_vectors = joint[gallery_offset:]
    for start in range(0, num_queries, block_rows):
        rows = slice(start, min(start + block_rows, num_queries))
        overlap = np.zeros((rows.stop - rows.start, num_gallery))
        for offset, query in enumerate(range(rows.start, rows.stop)):
            row = v.getrow(query)
            for column, value in zip(row.indices.tolist(), row.data.tolist(), strict=True):
                lo, hi = v_gallery.indptr[column], v_gallery.indptr[column + 1]
                overlap[offset, v_gallery.indices[lo:hi]] += np.minimum(value, v_gallery.data[lo:hi])
        jaccard = 1.0 - overlap / (2.0 - overlap)
        original = 2.0 - 2.0 * (queries[rows] @ gallery_vectors.T).astype(np.float64)
        original /= row_max[rows][:, None]
        final = (1.0 - params.lambda_value) * jaccard + params.lambda_value * original
        scores = -final
        if gallery is None:
            scores[np.arange(len(scores)), np.arange(rows.start, rows.stop)] = -np.inf
        yield rows, scores


@dataclass(frozen=True)
class PostprocessSettings:
    """A post-processing method and its parameters, as the ``postprocess`` config group gives them.

    Attributes:
        method: ``none``, ``aqe``, ``dba`` or ``k_reciprocal``.
        k: Neighbours of alpha-QE and DBA.
        alpha: Weight exponent of alpha-QE and DBA.
        k1, k2, lambda_value: The k-reciprocal parameters.
    """

    method: str = "none"
    k: int = 2
    alpha: float = 3.0
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        if self.method not in POSTPROCESS_METHODS:
            raise ValueError(f"postprocess.method must be one of {', '.join(POSTPROCESS_METHODS)}, got {self.method!r}")
        if self.k < 1 or self.alpha < 0:
            raise ValueError(
                f"postprocess.k must be >= 1 and postprocess.alpha >= 0, got k={self.k}, alpha={self.alpha}"
            )
        KReciprocalParams(self.k1, self.k2, self.lambda_value)

    @classmethod
    def from_mapping(cls, values: dict | None) -> PostprocessSettings:
        """From a config mapping (``lambda`` may stand for ``lambda_value``); unknown keys are refused."""
        values = dict(values or {})
        if "lambda" in values:
            values["lambda_value"] = values.pop("lambda")
        unknown = set(values) - {"method", "k", "alpha", "k1", "k2", "lambda_value"}
        if unknown:
            raise ValueError(
                f"postprocess has unknown keys {sorted(unknown)}: it takes method, k, alpha, k1, k2, lambda"
            )
        return cls(**values)

    def metrics(
        self, embeddings: np.ndarray, labels: np.ndarray, recall_at_k: Sequence[int], **gallery
    ) -> dict[str, float]:
        """The metrics after this post-processing (see :func:`calc_postprocessed_metrics`)."""
        return calc_postprocessed_metrics(
            embeddings, labels, self.method, tuple(recall_at_k), k=self.k, alpha=self.alpha,
            k_reciprocal=KReciprocalParams(self.k1, self.k2, self.lambda_value), **gallery,
        )  # fmt: skip


def rank_positives_from_scores(
    score_blocks: Iterator[tuple[slice, np.ndarray]],
    labels: np.ndarray,
    gallery_labels: np.ndarray | None = None,
) -> PositiveRanks:
    """The ranks of each query's positives in given score rows (higher is closer; equal scores by gallery index).

    Without ``gallery_labels`` the queries are the gallery and a query's own column is never a positive; its
    score must be -inf (it then ranks last and precedes no positive).

    Args:
        score_blocks: ``(rows, scores)`` blocks covering every query once, scores of shape (len(rows), G).
        labels: (N,) query classes.
        gallery_labels: (G,) gallery classes, or None when the queries are the gallery.
    """
    same_set = gallery_labels is None
    gallery_labels = labels if same_set else gallery_labels
    num_relevant = count_relevant(labels, None if same_set else gallery_labels)
    max_r = int(num_relevant.max(initial=0))
    negatives_before = np.zeros((len(labels), max_r), dtype=np.int64)
    for rows, scores in score_blocks:
        order = np.argsort(-scores, axis=1, kind="stable")
        for offset, query in enumerate(range(rows.start, rows.stop)):
            positive = gallery_labels[order[offset]] == labels[query]
            if same_set:
                positive &= order[offset] != query
            positions = np.flatnonzero(positive)
            negatives_before[query, : len(positions)] = positions - np.arange(len(positions))
    return PositiveRanks(num_relevant, negatives_before)


def calc_postprocessed_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    method: str,
    recall_at_k: tuple[int, ...] = (1, 2, 4, 8),
    *,
    gallery_embeddings: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    k: int = 2,
    alpha: float = 3.0,
    k_reciprocal: KReciprocalParams | None = None,
) -> dict[str, float]:
    """Recall@K, Precision@1, R-Precision and MAP@R after a post-processing method, by the exact protocol.

    ``dba`` without a gallery augments every item (queries are gallery items) and is scored by the exact
    evaluation; ``aqe`` and ``k_reciprocal`` score every query against the whole gallery and rank from the scores
    (equal scores by gallery index, a query's own row excluded by index). ``none`` is the plain evaluation.

    Returns:
        The metrics dict of :func:`~metricsearch.metrics.retrieval.calc_retrieval_metrics` (without NMI, which
        post-processing of the ranking does not change).
    """
    if method not in POSTPROCESS_METHODS:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_METHODS}, got {method!r}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    gallery = None if gallery_embeddings is None else np.ascontiguousarray(gallery_embeddings, dtype=np.float32)
    exact = {"recall_at_k": recall_at_k, "compute_nmi": False}
    if method == "none":
        return calc_retrieval_metrics(x, labels, gallery_embeddings=gallery, gallery_labels=gallery_labels, **exact)
    if method == "dba":
        if gallery is None:
            return calc_retrieval_metrics(augment_database(x, k, alpha), labels, **exact)
        return calc_retrieval_metrics(
            x, labels, gallery_embeddings=augment_database(gallery, k, alpha), gallery_labels=gallery_labels, **exact
        )
    if method == "aqe":
        expanded = expand_queries(x, gallery, k, alpha)
        target = x if gallery is None else gallery
        blocks = _plain_score_blocks(expanded, target, exclude_self=gallery is None)
    else:
        blocks = k_reciprocal_scores(x, gallery, k_reciprocal)
    ranks = rank_positives_from_scores(blocks, labels, None if gallery is None else np.asarray(gallery_labels))
    answerable = ranks.num_relevant > 0
    if not answerable.any():
        raise ValueError("no query has a gallery item of its class: there is nothing to rank")
    metrics = calc_metrics_from_positive_ranks(ranks, recall_at_k, answerable)
    metrics["num_queries"] = float(np.count_nonzero(answerable))
    metrics["num_queries_left_out"] = float(np.count_nonzero(~answerable))
    return metrics


def _plain_score_blocks(
    queries: np.ndarray, gallery: np.ndarray, exclude_self: bool, block_rows: int = 1024
) -> Iterator[tuple[slice, np.ndarray]]:
    """Inner products as float64 sums of float32 products rounded to float32 (copies tie), own column -inf."""
    gallery64 = gallery.astype(np.float64)
    for start in range(0, len(queries), block_rows):
        rows = slice(start, min(start + block_rows, len(queries)))
        scores = (queries[rows].astype(np.float64) @ gallery64.T).astype(np.float32).astype(np.float64)
        if exclude_self:
            scores[np.arange(len(scores)), np.arange(rows.start, rows.stop)] = -np.inf
        yield rows, scores
