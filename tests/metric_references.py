"""Plain references and test data for the retrieval metrics, shared by the metric tests and the kernel tests.

Each reference is computed straight from the definitions (a full stable sort in float64), so that the fast paths can
be checked against something obviously right.
"""

from __future__ import annotations

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
