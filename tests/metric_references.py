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


def brute_force_neighbors(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full N x N similarity in float64, self masked by index, stable sort (ties: lower index first)."""
    similarity = x.astype(np.float64) @ x.astype(np.float64).T
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
