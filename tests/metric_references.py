"""Plain references and test data for the retrieval metrics, shared by the metric tests and the kernel tests.

Each reference is computed straight from the definitions (a full stable sort in float64), so that the fast paths can
be checked against something obviously right.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import pytest

# Values computed from the same neighbour lists, summed in another order, differ in the last bits only.
SUM_ORDER_TOL = 1e-12
# Scores closer than this may be ordered either way by float32 kernels (faiss, BLAS) with other rounding.
NEAR_TIE = 1e-6


def pairwise_scores(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Float64 sums of the (exact) float64 products of the float32 coordinates, computed row by row in the same order
    for every pair, so that exact copies get equal scores and tie.

    Not a matrix product: BLAS sums a product's entries in an order that depends on where they sit in the matrix and
    on the CPU's kernel (an AVX-512 OpenBLAS scored copies 1e-16 apart), which would order exact copies by rounding.
    """
    q64, g64 = queries.astype(np.float64), gallery.astype(np.float64)
    return np.stack([(g64 * q64[row]).sum(axis=1) for row in range(len(q64))])


def brute_force_neighbors(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full N x N similarity in float64 (pairwise_scores), self masked by index, stable sort (ties: lower index
    first)."""
    similarity = pairwise_scores(x, x)
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarity, order, axis=1), order


def reference_metrics(x: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """One query at a time, straight from the definitions; singleton queries are skipped."""
    _, order = brute_force_neighbors(x, len(x) - 1)
    hits = {k: 0 for k in ks}
    r_precisions, average_precisions = [], []
    for query in range(len(x)):
        num_relevant = int(np.sum(labels == labels[query])) - 1
        if num_relevant == 0:
            continue
        correct = [bool(labels[n] == labels[query]) for n in order[query]]
        for k in ks:
            hits[k] += any(correct[:k])
        r_precisions.append(sum(correct[:num_relevant]) / num_relevant)
        precision_sum, num_correct = 0.0, 0
        for rank in range(1, num_relevant + 1):
            if correct[rank - 1]:
                num_correct += 1
                precision_sum += num_correct / rank
        average_precisions.append(precision_sum / num_relevant)
    num_queries = len(r_precisions)
    metrics = {f"recall@{k}": hits[k] / num_queries for k in ks}
    metrics["precision@1"] = hits[1] / num_queries
    metrics["r_precision"] = sum(r_precisions) / num_queries
    metrics["map@r"] = sum(average_precisions) / num_queries
    metrics["num_queries"] = float(num_queries)
    metrics["num_queries_left_out"] = float(len(x) - num_queries)
    return metrics


def make_clustered_data(seed: int, num_classes: int = 60, dim: int = 16, noise: float = 1.2):
    """Random class sizes from 1 (singletons) to 8, Gaussian clusters, L2-normalised float32 embeddings."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, size=num_classes)
    labels = rng.permutation(np.repeat(np.arange(num_classes), sizes))
    centers = rng.normal(size=(num_classes, dim))
    x = centers[labels] + noise * rng.normal(size=(len(labels), dim))
    return normalize(x), labels


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_no_deciding_near_ties(x: np.ndarray, labels: np.ndarray, k: int) -> None:
    """Checks the test data: no two neighbours, one correct and one not, have true scores closer than float32
    rounding within the first k + 1 places. Otherwise the metrics would depend on rounding, not on the code."""
    scores, order = brute_force_neighbors(x, k + 1)
    correct = labels[order] == labels[:, None]
    deciding = (np.diff(-scores, axis=1) < NEAR_TIE) & (correct[:, 1:] != correct[:, :-1])
    assert not deciding.any(), "the test data has a near-tie that decides a metric: pick another seed"


def assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert isinstance(actual[key], float), key
        if key.startswith(("recall@", "precision@", "num_queries")):
            assert actual[key] == value, key
        else:
            assert actual[key] == pytest.approx(value, abs=SUM_ORDER_TOL), key


def brute_force_gallery_order(queries: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every query's gallery sorted by decreasing score (pairwise_scores), ties by increasing gallery index (no
    self-exclusion)."""
    similarity = pairwise_scores(queries, gallery)
    order = np.argsort(-similarity, axis=1, kind="stable")
    return np.take_along_axis(similarity, order, axis=1), order


def reference_query_gallery_metrics(
    queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, ks
) -> dict[str, float]:
    """Queries searched in a separate gallery, one at a time, from the definitions; R = the gallery items of the
    query's class, and queries with R = 0 skipped."""
    _, order = brute_force_gallery_order(queries, gallery)
    hits = {k: 0 for k in ks}
    r_precisions, average_precisions = [], []
    for query in range(len(queries)):
        num_relevant = int(np.sum(gallery_labels == query_labels[query]))
        if num_relevant == 0:
            continue
        correct = [bool(gallery_labels[n] == query_labels[query]) for n in order[query]]
        for k in ks:
            hits[k] += any(correct[:k])
        r_precisions.append(sum(correct[:num_relevant]) / num_relevant)
        precision_sum, num_correct = 0.0, 0
        for rank in range(1, num_relevant + 1):
            if correct[rank - 1]:
                num_correct += 1
                precision_sum += num_correct / rank
        average_precisions.append(precision_sum / num_relevant)
    num_queries = len(r_precisions)
    metrics = {f"recall@{k}": hits[k] / num_queries for k in ks}
    metrics["precision@1"] = hits[1] / num_queries
    metrics["r_precision"] = sum(r_precisions) / num_queries
    metrics["map@r"] = sum(average_precisions) / num_queries
    metrics["num_queries"] = float(num_queries)
    metrics["num_queries_left_out"] = float(len(queries) - num_queries)
    return metrics


def make_query_gallery_data(seed: int, num_classes: int = 50, dim: int = 16, noise: float = 1.2):
    """Queries and a gallery around the same Gaussian class centres: 0-5 queries and 0-6 gallery items per class, so
    that some queries' classes are missing from the gallery and some gallery classes have no query."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim))
    parts = []
    for most in (5, 6):
        labels = rng.permutation(np.repeat(np.arange(num_classes), rng.integers(0, most + 1, size=num_classes)))
        parts += [normalize(centers[labels] + noise * rng.normal(size=(len(labels), dim))), labels]
    return tuple(parts)


def make_quantised_data(seed: int, num_queries: int = 120, num_gallery: int = 160, dim: int = 8, num_classes: int = 12):
    """Unit vectors whose float32 inner products are exact (every coordinate in {0, +-1/2} with four nonzeros, or
    +-1 on one axis), so that scores tie exactly in any kernel: a few dozen distinct vectors, many ties."""
    rng = np.random.default_rng(seed)

    def draw(count: int) -> np.ndarray:
        x = np.zeros((count, dim), dtype=np.float32)
        for row in range(count):
            if rng.random() < 0.2:
                x[row, rng.integers(dim)] = rng.choice([-1.0, 1.0])
            else:
                x[row, rng.choice(dim, size=4, replace=False)] = rng.choice([-0.5, 0.5], size=4)
        return x

    return (draw(num_queries), rng.integers(0, num_classes, num_queries),
            draw(num_gallery), rng.integers(0, num_classes, num_gallery))  # fmt: skip


def assert_no_deciding_gallery_near_ties(queries, query_labels, gallery, gallery_labels) -> None:
    """Checks the test data: no two consecutive gallery items, one correct and one not, have true scores closer than
    float32 rounding without being exactly equal (exact ties are decided by the index rule, not by rounding)."""
    scores, order = brute_force_gallery_order(queries, gallery)
    correct = gallery_labels[order] == query_labels[:, None]
    gap = np.diff(-scores, axis=1)
    deciding = (gap > 0) & (gap < NEAR_TIE) & (correct[:, 1:] != correct[:, :-1])
    assert not deciding.any(), "the test data has a near-tie that decides a metric: pick another seed"


# The metrics from neighbour lists: exact k-NN with faiss, then each metric from the neighbours' labels, each small
# enough to check by hand. The package computes them from the ranks of the positives instead
# (calc_retrieval_metrics); these are references it is checked against.


def find_neighbors(embeddings: np.ndarray, k: int, *, chunk_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Finds the exact k nearest neighbours by inner product of every row among all the other rows.

    The embeddings are expected to be L2-normalised, so the inner product is the cosine similarity. Queries are
    searched in chunks of ``chunk_size`` rows, which keeps memory at O(N * k) instead of O(N^2).

    Each query is removed from its own results by index, not by position: ``k + 1`` neighbours are searched and
    the column holding the query's own index is dropped, or the last column when the query is not among them.
    With exact duplicate images the query's own index need not come first, so dropping the first column would
    drop a true neighbour and keep the query itself.

    Neighbours of exactly equal score are ordered by increasing index; which members of a group of equal scores
    straddling the k-th place are returned is up to faiss. Scores come from faiss' BLAS kernels, whose rounding
    may change with the chunk size and thread count, so neighbours whose scores differ by about 1e-7 may swap.

    Args:
        embeddings: Array of shape (N, D), one embedding per row.
        k: Number of neighbours per query; clipped to N - 1.
        chunk_size: Number of queries searched at once.

    Returns:
        ``(scores, indices)``, both of shape (N, min(k, N - 1)): inner products (float32, non-increasing along
        each row) and row indices (int64) of the neighbours.

    Raises:
        ValueError: If the embeddings are not a finite 2D array with at least two rows, or ``k`` or
            ``chunk_size`` is smaller than 1.

    Example:
        >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], dtype=np.float32)
        >>> scores, indices = find_neighbors(x, k=1)
        >>> indices[:, 0].tolist()
        [2, 2, 0]
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    num_items = x.shape[0]
    k = min(k, num_items - 1)

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)

    scores = np.empty((num_items, k), dtype=np.float32)
    indices = np.empty((num_items, k), dtype=np.int64)
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        chunk_scores, chunk_indices = index.search(x[start:stop], k + 1)
        keep = _columns_without_self(chunk_indices, np.arange(start, stop))
        chunk_scores = chunk_scores[keep].reshape(stop - start, k)
        chunk_indices = chunk_indices[keep].reshape(stop - start, k)
        _order_ties_by_index(chunk_scores, chunk_indices)
        scores[start:stop] = chunk_scores
        indices[start:stop] = chunk_indices
    return scores, indices


def calc_recall_at_k(neighbor_labels: np.ndarray, labels: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Computes Recall@K: the fraction of queries with at least one correct item among their K nearest neighbours.

    Every query is counted, so leave out queries of singleton classes first (see ``count_relevant``): they can
    never be answered. A K larger than the number of neighbour columns uses all the columns.

    Args:
        neighbor_labels: Array of shape (Q, K_max), the labels of each query's neighbours, nearest first.
        labels: Array of shape (Q,), the label of each query.
        ks: The values of K.

    Returns:
        A dict from K to Recall@K.

    Example:
        >>> neighbor_labels = np.array([[1, 0, 0], [2, 2, 1], [0, 0, 1]])
        >>> calc_recall_at_k(neighbor_labels, np.array([0, 1, 2]), ks=[1, 2, 3])
        {1: 0.0, 2: 0.3333333333333333, 3: 0.6666666666666666}
    """
    ks = [int(k) for k in ks]
    first_hit = _first_correct_rank(neighbor_labels, labels)
    num_queries = len(first_hit)
    if num_queries == 0:
        return {k: 0.0 for k in ks}
    return {k: float(np.count_nonzero(first_hit < k)) / num_queries for k in ks}


def calc_r_precision(neighbor_labels: np.ndarray, labels: np.ndarray, num_relevant: np.ndarray) -> float:
    """Computes R-Precision: the mean fraction of correct items among each query's R nearest neighbours.

    Args:
        neighbor_labels: Array of shape (Q, K) with ``K >= max(num_relevant)``, the labels of each query's
            neighbours, nearest first.
        labels: Array of shape (Q,), the label of each query.
        num_relevant: Array of shape (Q,), R for each query: the number of other items of its class (>= 1).

    Returns:
        R-Precision averaged over the queries.

    Example:
        >>> neighbor_labels = np.array([[0, 1, 0], [1, 1, 0]])
        >>> calc_r_precision(neighbor_labels, np.array([0, 1]), num_relevant=np.array([2, 1]))
        0.75
    """
    correct, num_relevant = _correct_within_r(neighbor_labels, labels, num_relevant)
    if len(num_relevant) == 0:
        return 0.0
    return float(np.mean(correct.sum(axis=1) / num_relevant))


def calc_map_at_r(neighbor_labels: np.ndarray, labels: np.ndarray, num_relevant: np.ndarray) -> float:
    """Computes MAP@R: the mean over queries of (1/R) * sum_{i<=R} P@i * [i-th neighbour is correct].

    Args:
        neighbor_labels: Array of shape (Q, K) with ``K >= max(num_relevant)``, the labels of each query's
            neighbours, nearest first.
        labels: Array of shape (Q,), the label of each query.
        num_relevant: Array of shape (Q,), R for each query: the number of other items of its class (>= 1).

    Returns:
        MAP@R averaged over the queries.

    Example:
        With R = 3 and hits at ranks 1 and 3, AP@R = (1/1 + 2/3) / 3 = 5/9:

        >>> round(calc_map_at_r(np.array([[4, 0, 4, 4]]), np.array([4]), num_relevant=np.array([3])), 6)
        0.555556
    """
    correct, num_relevant = _correct_within_r(neighbor_labels, labels, num_relevant)
    if len(num_relevant) == 0:
        return 0.0
    ranks = np.arange(1, correct.shape[1] + 1, dtype=np.float64)
    precision_at_i = np.cumsum(correct, axis=1) / ranks
    average_precision = np.sum(precision_at_i * correct, axis=1) / num_relevant
    return float(np.mean(average_precision))


def _columns_without_self(neighbors: np.ndarray, query_indices: np.ndarray) -> np.ndarray:
    """Marks the columns to keep: all but the query's own index, or all but the last when it is absent."""
    is_self = neighbors == query_indices[:, None]
    has_self = is_self.any(axis=1)
    drop = np.where(has_self, is_self.argmax(axis=1), neighbors.shape[1] - 1)
    keep = np.ones(neighbors.shape, dtype=bool)
    keep[np.arange(len(neighbors)), drop] = False
    return keep


def _order_ties_by_index(scores: np.ndarray, indices: np.ndarray) -> None:
    """Sorts, in place, the neighbours of equal score by increasing index.

    faiss returns exact ties (duplicate images) in an arbitrary order; this makes the order reproducible. Only
    the rows that hold a tie are sorted, which keeps it cheap.
    """
    rows = np.flatnonzero((scores[:, 1:] == scores[:, :-1]).any(axis=1))
    if rows.size == 0:
        return
    # np.lexsort sorts by its last key first: decreasing score, then increasing index.
    order = np.lexsort((indices[rows], -scores[rows]), axis=-1)
    scores[rows] = np.take_along_axis(scores[rows], order, axis=1)
    indices[rows] = np.take_along_axis(indices[rows], order, axis=1)


def _first_correct_rank(neighbor_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Returns the 0-based rank of each query's first correct neighbour; a query with none gets int64 max."""
    neighbor_labels, labels = _check_neighbor_labels(neighbor_labels, labels)
    correct = neighbor_labels == labels[:, None]
    return np.where(correct.any(axis=1), correct.argmax(axis=1), np.iinfo(np.int64).max)


def _correct_within_r(
    neighbor_labels: np.ndarray, labels: np.ndarray, num_relevant: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Returns which of the first max(R) neighbours are correct and within each query's R, and R itself."""
    neighbor_labels, labels = _check_neighbor_labels(neighbor_labels, labels)
    num_relevant = np.asarray(num_relevant)
    if num_relevant.shape != labels.shape:
        raise ValueError(f"num_relevant must have shape {labels.shape}, got {num_relevant.shape}")
    if len(num_relevant) == 0:
        return np.zeros((0, 0), dtype=bool), num_relevant
    if num_relevant.min() < 1:
        raise ValueError("every query needs R >= 1; leave out the queries of singleton classes")
    max_r = int(num_relevant.max())
    if neighbor_labels.shape[1] < max_r:
        raise ValueError(f"need at least max(R) = {max_r} neighbours per query, got {neighbor_labels.shape[1]}")
    within_r = np.arange(max_r) < num_relevant[:, None]
    correct = (neighbor_labels[:, :max_r] == labels[:, None]) & within_r
    return correct, num_relevant


def _check_neighbor_labels(neighbor_labels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    neighbor_labels = np.asarray(neighbor_labels)
    labels = np.asarray(labels)
    if neighbor_labels.ndim != 2 or labels.ndim != 1 or len(neighbor_labels) != len(labels):
        raise ValueError(
            "neighbor_labels must have shape (Q, K) and labels shape (Q,), "
            f"got {neighbor_labels.shape} and {labels.shape}"
        )
    return neighbor_labels, labels
