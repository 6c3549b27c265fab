"""The blocked positive-rank evaluation equals a plain neighbour-list reference, on the CPU kernel and the torch path.

The torch path is what runs on a GPU; running it on the CPU here checks the same code. Exact ties between a
query's positive and a negative (duplicate images filed under two classes) are where the two could disagree, so
they get cases of their own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metricsearch.metrics import calc_retrieval_metrics
from metricsearch.metrics.positive_ranks import numba_available, rank_positives
from tests.test_metrics import assert_metrics_equal, make_clustered_data, normalize, reference_metrics

KS = (1, 2, 4, 8, 16, 1000)
PATHS = [None, "cpu"]  # None: the numba kernel; "cpu": the torch implementation that runs on GPUs


def reference_first_hit_and_ranks(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Per query, from a full stable sort (ties: lower index first): rank of the first positive, ranks of all."""
    similarity = x.astype(np.float32) @ x.astype(np.float32).T
    np.fill_diagonal(similarity, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), similarity.shape), -similarity), axis=1)
    first, ranks = [], []
    for query in range(len(x)):
        correct = labels[order[query]] == labels[query]
        correct[-1] = False  # the query itself, sorted last
        hits = np.flatnonzero(correct)
        first.append(hits[0] if len(hits) else -1)
        ranks.append((hits + 1).tolist())
    return np.array(first), ranks


@pytest.mark.parametrize("device", PATHS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_reference(seed, device):
    x, labels = make_clustered_data(seed, num_classes=80)
    actual = calc_retrieval_metrics(x, labels, recall_at_k=KS, compute_nmi=False, device=device)
    assert_metrics_equal(actual, reference_metrics(x, labels, KS))


@pytest.mark.parametrize("device", PATHS)
@pytest.mark.parametrize("block_size", [1, 5, 64, None])
def test_block_size_does_not_change_the_counts(block_size, device):
    x, labels = make_clustered_data(7, num_classes=50)
    expected_first, expected_ranks = reference_first_hit_and_ranks(x, labels)
    ranks = rank_positives(x, labels, max_k=len(x), block_size=block_size, device=device)
    assert_ranks_match(ranks, expected_first, expected_ranks, every_rank=device is not None)


def assert_ranks_match(ranks, expected_first, expected_ranks, every_rank: bool) -> None:
    """First hits must be exact (max_k = N prunes none); ranks of positives within the top R must be exact, and
    with ``every_rank`` (the torch path, which never prunes) the ranks of all positives."""
    inside, positive_ranks = ranks.positives_within_r()
    for query in np.flatnonzero(ranks.num_relevant > 0):
        r = ranks.num_relevant[query]
        assert ranks.first_hit_rank[query] == expected_first[query]
        expected = np.array(expected_ranks[query])
        np.testing.assert_array_equal(inside[query, :r], expected <= r)
        if every_rank:
            np.testing.assert_array_equal(positive_ranks[query, :r], expected)
        else:
            np.testing.assert_array_equal(positive_ranks[query, :r][expected <= r], expected[expected <= r])


def test_pruning_keeps_every_deciding_count_exact():
    # Untrained-like embeddings (random): first hits far down the list, so pruning removes most of the work.
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 150, size=600)
    x = normalize(rng.normal(size=(600, 8)))
    exact = rank_positives(x, labels, max_k=len(x), device="cpu")
    for max_k in (1, 4, 50):
        pruned = rank_positives(x, labels, max_k=max_k, block_size=37)
        first = exact.first_hit_rank
        np.testing.assert_array_equal(np.minimum(pruned.first_hit_rank, max_k), np.minimum(first, max_k))
        inside, ranks = pruned.positives_within_r()
        inside_exact, ranks_exact = exact.positives_within_r()
        np.testing.assert_array_equal(inside, inside_exact)
        np.testing.assert_array_equal(ranks[inside], ranks_exact[inside_exact])


@pytest.mark.parametrize("device", PATHS)
def test_exact_ties_between_positives_and_negatives_follow_the_index(device):
    # Items 3 and 4 are exact copies of query 0's classmates 1 and 2 filed under other classes, and item 5 is a
    # copy of query 0 itself. Equal scores are ordered by index, so here each positive comes before its copy.
    e = np.eye(4, dtype=np.float32)
    a = normalize([e[0] + e[1]])[0]
    b = normalize([e[0] + 0.5 * e[2]])[0]
    x = np.stack([e[0], a, b, a, b, e[0], e[3], e[3]])
    labels = np.array([0, 0, 0, 1, 2, 3, 4, 4])
    expected_first, expected_ranks = reference_first_hit_and_ranks(x, labels)
    ranks = rank_positives(x, labels, max_k=len(x), device=device)
    assert_ranks_match(ranks, expected_first, expected_ranks, every_rank=device is not None)
    # Moving the duplicates in front of their classmates in index order turns the ties the other way.
    permutation = [3, 4, 5, 0, 1, 2, 6, 7]
    xp, lp = x[permutation], labels[permutation]
    expected_first, expected_ranks = reference_first_hit_and_ranks(xp, lp)
    ranks = rank_positives(xp, lp, max_k=len(x), device=device)
    assert_ranks_match(ranks, expected_first, expected_ranks, every_rank=device is not None)


def test_kernel_and_torch_paths_agree_on_many_duplicates():
    rng = np.random.default_rng(0)
    base = normalize(rng.normal(size=(40, 6)))
    x = np.concatenate([base, base, base[:20]])
    labels = rng.integers(0, 25, size=len(x))
    kernel = calc_retrieval_metrics(x, labels, recall_at_k=(1, 3, 10), compute_nmi=False, chunk_size=16)
    torch_path = calc_retrieval_metrics(x, labels, recall_at_k=(1, 3, 10), compute_nmi=False, device="cpu")
    assert kernel == torch_path
    assert_metrics_equal(kernel, reference_metrics(x, labels, (1, 3, 10)))


def test_the_cpu_kernel_is_used():
    # The speed of the evaluation rests on it; the torch fallback is correct but many times slower on a CPU.
    assert numba_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_the_cpu():
    x, labels = make_clustered_data(4, num_classes=200, dim=64)
    cpu = calc_retrieval_metrics(x, labels, recall_at_k=KS, compute_nmi=False)
    assert calc_retrieval_metrics(x, labels, recall_at_k=KS, compute_nmi=False, device="cuda") == cpu
