"""Tests of the retrieval evaluation against plain references, hand-made cases and pytorch-metric-learning."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

import metricsearch.metrics.metric as metric_module
import metricsearch.metrics.retrieval as retrieval_module
from metricsearch.metrics import RetrievalMetric, calc_nmi, calc_retrieval_metrics, count_relevant
from metricsearch.metrics.kmeans import KMeansSchedule, kmeans_cost, nmi_schedule, torch_kmeans
from tests.metric_references import (
    NEAR_TIE,
    SUM_ORDER_TOL,
    assert_metrics_equal,
    assert_no_deciding_near_ties,
    brute_force_neighbors,
    calc_map_at_r,
    calc_r_precision,
    calc_recall_at_k,
    find_neighbors,
    make_clustered_data,
    normalize,
    reference_metrics,
)

SEEDS = [0, 1, 2, 3, 4]
KS = (1, 2, 4, 8, 16)
# ----------------------------------------------------------------------------------------------------------------
# Against the brute-force reference


@pytest.mark.parametrize("seed", SEEDS)
def test_find_neighbors_matches_brute_force(seed):
    x, _ = make_clustered_data(seed)
    k = 20
    scores, indices = find_neighbors(x, k=k)
    expected_scores, expected_indices = brute_force_neighbors(x, k=k + 1)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert scores.shape == indices.shape == (len(x), k)
    np.testing.assert_allclose(scores, expected_scores[:, :k], atol=1e-6)
    # Neighbours whose true scores are closer than float32 rounding may come in either order (or, at the k-th
    # place, be swapped for the next one); every other position must match exactly.
    near_tie = np.diff(-expected_scores, axis=1) < NEAR_TIE
    ambiguous = near_tie | np.pad(near_tie[:, :-1], ((0, 0), (1, 0)))
    np.testing.assert_array_equal(indices[~ambiguous], expected_indices[:, :k][~ambiguous])
    assert ambiguous.mean() < 0.01


@pytest.mark.parametrize("seed", SEEDS)
def test_retrieval_metrics_match_reference(seed):
    x, labels = make_clustered_data(seed)
    assert_no_deciding_near_ties(x, labels, k=max(max(KS), int(count_relevant(labels).max())))
    actual = calc_retrieval_metrics(x, labels, recall_at_k=KS, compute_nmi=False)
    assert_metrics_equal(actual, reference_metrics(x, labels, KS))
    assert actual["num_queries"] == np.sum(count_relevant(labels) > 0) < len(labels)


def test_k_is_clipped_to_the_gallery_size():
    x, _ = make_clustered_data(0, num_classes=3)
    scores, indices = find_neighbors(x, k=1000)
    assert indices.shape == (len(x), len(x) - 1)
    for query, row in enumerate(indices):
        assert sorted(row.tolist()) == [i for i in range(len(x)) if i != query]


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunking_gives_identical_results(chunk_size):
    x, labels = make_clustered_data(5)
    one_chunk = find_neighbors(x, k=12, chunk_size=len(x))
    chunked = find_neighbors(x, k=12, chunk_size=chunk_size)
    np.testing.assert_array_equal(chunked[0], one_chunk[0])
    np.testing.assert_array_equal(chunked[1], one_chunk[1])
    assert calc_retrieval_metrics(x, labels, chunk_size=chunk_size) == calc_retrieval_metrics(x, labels)


# ----------------------------------------------------------------------------------------------------------------
# Hand-made cases with known answers

E1, E2, E3 = np.eye(3, dtype=np.float32)


def test_ties_within_a_class_do_not_change_the_answer():
    # Query 0 has its two classmates tied at cos 0.707: whichever comes first, all its metrics are 1.
    a0, a1, a2 = E1, normalize([E1 + E2])[0], normalize([E1 + E3])[0]
    b3, b4 = -E1, normalize([-E1 - E2])[0]
    x = np.stack([a0, a1, a2, b3, b4])
    labels = np.array([0, 0, 0, 1, 1])
    scores, _ = find_neighbors(x, k=2)
    assert scores[0, 0] == scores[0, 1]
    for permutation in ([0, 1, 2, 3, 4], [4, 2, 3, 1, 0], [1, 3, 0, 4, 2]):
        metrics = calc_retrieval_metrics(x[permutation], labels[permutation], recall_at_k=(1, 2), compute_nmi=False)
        assert metrics == {
            "recall@1": 1.0,
            "recall@2": 1.0,
            "precision@1": 1.0,
            "r_precision": 1.0,
            "map@r": 1.0,
            "num_queries": 5.0,
            "num_queries_left_out": 0.0,
        }


def test_tied_wrong_neighbours_and_singletons():
    # q has two wrong neighbours tied at cos 0.707, then its one classmate c at 0.6; w1 and w2 are singletons.
    q, c = E1, np.array([0.6, -0.8, 0.0], dtype=np.float32)
    w1, w2 = normalize([E1 + E2])[0], normalize([E1 + E3])[0]
    x = np.stack([q, w1, w2, c])
    labels = np.array([0, 1, 2, 0])
    expected = {
        "recall@1": 0.5,  # q misses, c finds q
        "recall@2": 0.5,
        "recall@4": 1.0,  # K > N - 1 uses the whole gallery
        "precision@1": 0.5,
        "r_precision": 0.5,  # R = 1 for both queries
        "map@r": 0.5,
        "num_queries": 2.0,
        "num_queries_left_out": 2.0,  # the singletons w1 and w2
    }
    for permutation in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        metrics = calc_retrieval_metrics(x[permutation], labels[permutation], recall_at_k=(1, 2, 4), compute_nmi=False)
        assert metrics == expected


def test_singleton_queries_are_excluded_and_counted():
    x, labels = make_clustered_data(2)
    singletons = count_relevant(labels) == 0
    assert singletons.sum() > 0
    metrics = calc_retrieval_metrics(x, labels, compute_nmi=False)
    assert metrics["num_queries"] == len(labels) - singletons.sum()
    assert metrics["num_queries_left_out"] == singletons.sum()
    # Singletons stay in the gallery, so they can still be wrong neighbours of the other queries.
    without_singletons = calc_retrieval_metrics(x[~singletons], labels[~singletons], compute_nmi=False)
    assert metrics["num_queries"] == without_singletons["num_queries"]
    assert metrics["recall@1"] <= without_singletons["recall@1"]


def test_only_singletons_gives_zeros_with_a_warning():
    x = normalize(np.random.default_rng(0).normal(size=(4, 3)))
    with pytest.warns(RuntimeWarning, match="No query"):
        metrics = calc_retrieval_metrics(x, np.arange(4), recall_at_k=(1, 2))
    assert metrics["num_queries"] == 0.0
    assert metrics["recall@1"] == metrics["map@r"] == metrics["r_precision"] == 0.0
    assert metrics["nmi"] == pytest.approx(1.0)


@pytest.mark.parametrize("query_first", [True, False])
def test_duplicate_in_another_class_is_a_miss(query_first):
    # The query q has an identical copy d of another class, and a less similar classmate s.
    s, d2 = np.array([0.8, 0.6, 0.0], dtype=np.float32), -E1
    q_index, d_index = (0, 1) if query_first else (1, 0)
    x = np.zeros((4, 3), dtype=np.float32)
    x[[q_index, d_index, 2, 3]] = [E1, E1, s, d2]
    labels = np.zeros(4, dtype=np.int64)
    labels[[q_index, d_index, 2, 3]] = [0, 1, 0, 1]
    scores, indices = find_neighbors(x, k=3)
    # The query is dropped by index, wherever faiss put it among the equal scores.
    assert indices[q_index, 0] == d_index and indices[d_index, 0] == q_index
    assert scores[q_index, 0] == scores[d_index, 0] == pytest.approx(1.0)
    for query in (q_index, d_index):
        recall = calc_recall_at_k(labels[indices[[query]]], labels[[query]], ks=[1, 3])
        assert recall == {1: 0.0, 3: 1.0}


def test_duplicate_in_the_same_class_is_a_hit():
    x = np.stack([E2, E1, E1, normalize([E1 + E2])[0]])
    labels = np.array([1, 0, 0, 1])
    _, indices = find_neighbors(x, k=1)
    assert indices[1:3, 0].tolist() == [2, 1]
    assert calc_recall_at_k(labels[indices[1:3]], labels[1:3], ks=[1]) == {1: 1.0}


def test_many_identical_copies_never_return_the_query():
    rng = np.random.default_rng(0)
    base = normalize(rng.normal(size=(30, 64)))
    x = np.concatenate([base, base, base])  # item i has copies at i +- 30 and i +- 60
    _, indices = find_neighbors(x, k=3)
    for query, row in enumerate(indices):
        copies = {(query + 30) % 90, (query + 60) % 90}
        assert query not in row
        assert set(row[:2].tolist()) == copies
        assert row[0] < row[1]  # exact ties come in index order


def test_map_at_r_by_hand():
    labels = np.array([0, 5])
    neighbor_labels = np.array([[0, 1, 0, 0, 1], [7, 5, 5, 7, 7]])
    num_relevant = np.array([3, 2])
    # Query 0, R = 3: correct, wrong, correct -> (1/1 + 2/3) / 3 = 5/9.
    # Query 1, R = 2: wrong, correct -> (1/2) / 2 = 1/4; its third neighbour is beyond R and does not count.
    assert calc_map_at_r(neighbor_labels, labels, num_relevant) == pytest.approx((5 / 9 + 1 / 4) / 2, abs=1e-15)
    assert calc_r_precision(neighbor_labels, labels, num_relevant) == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-15)
    assert calc_recall_at_k(neighbor_labels, labels, ks=[1, 2, 5]) == {1: 0.5, 2: 1.0, 5: 1.0}


def test_count_relevant():
    assert count_relevant(np.array(["a", "b", "a", "c", "a"])).tolist() == [2, 0, 2, 0, 2]


# ----------------------------------------------------------------------------------------------------------------
# Against pytorch-metric-learning and scikit-learn


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_pytorch_metric_learning(seed):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    x, labels = make_clustered_data(seed)
    # pml >= 2 dropped `embeddings_come_from_same_source`; leaving `reference` out means the same thing.
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    expected = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    actual = calc_retrieval_metrics(x, labels, compute_nmi=False)

    # pml searches with IndexFlatL2: near-ties in float32 may come out in another order.
    max_r = int(count_relevant(labels).max())
    _, pml_indices = FaissKNN()(torch.from_numpy(x), max_r, torch.from_numpy(x), True)
    same_neighbors = np.array_equal(pml_indices.numpy(), find_neighbors(x, max_r)[1])
    tolerance = SUM_ORDER_TOL if same_neighbors else 1e-5
    assert actual["precision@1"] == pytest.approx(expected["precision_at_1"], abs=tolerance)
    assert actual["r_precision"] == pytest.approx(expected["r_precision"], abs=tolerance)
    assert actual["map@r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=tolerance)


def sklearn_nmi(x: np.ndarray, labels: np.ndarray) -> float:
    num_classes = len(np.unique(labels))
    clusters = KMeans(n_clusters=num_classes, n_init=10, random_state=0).fit_predict(x)
    return normalized_mutual_info_score(labels, clusters)


def test_nmi_on_separated_clusters_is_one():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 25)
    x = normalize(np.eye(16)[labels] + 0.05 * rng.normal(size=(len(labels), 16)))
    assert calc_nmi(x, labels) == pytest.approx(1.0)
    assert sklearn_nmi(x, labels) == pytest.approx(1.0)


def test_nmi_on_random_labels_is_low():
    rng = np.random.default_rng(0)
    x = normalize(rng.normal(size=(300, 16)))
    labels = rng.integers(0, 10, size=300)
    ours, theirs = calc_nmi(x, labels), sklearn_nmi(x, labels)
    assert ours < 0.15 and theirs < 0.15
    assert ours == pytest.approx(theirs, abs=0.05)


def test_nmi_is_seeded():
    x, labels = make_clustered_data(3)
    assert calc_nmi(x, labels, seed=1) == calc_nmi(x, labels, seed=1)
    metrics = calc_retrieval_metrics(x, labels, seed=1)
    assert metrics["nmi"] == calc_nmi(x, labels, seed=1)
    assert 0.0 <= metrics["nmi"] <= 1.0


def plain_lloyd(x: np.ndarray, init: np.ndarray, niter: int) -> np.ndarray:
    """k-means by the textbook: nearest centroid by explicit squared distances, centroids as member means."""
    centroids = x[init].astype(np.float64)
    for _ in range(niter):
        assignment = np.array([np.argmin([np.sum((p - c) ** 2) for c in centroids]) for p in x])
        for k in range(len(centroids)):
            if np.any(assignment == k):
                centroids[k] = x[assignment == k].mean(axis=0)
    return np.array([np.argmin([np.sum((p - c) ** 2) for c in centroids]) for p in x])


def separated_blobs(seed: int, noise: float, num_classes: int = 10, per_class: int = 40, dim: int = 16):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = normalize(rng.normal(size=(num_classes, dim)))
    return normalize(centres[labels] + noise * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_kmeans_matches_a_plain_lloyd_loop(seed):
    # The GPU's k-means (run here on the CPU) from the same starting rows as the textbook loop.
    x, _ = separated_blobs(seed, noise=0.35, per_class=12)
    init = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:10].numpy()
    ours = torch_kmeans(torch.from_numpy(x), 10, KMeansSchedule(niter=8, nredo=1), seed=seed).numpy()
    np.testing.assert_array_equal(ours, plain_lloyd(x, init, niter=8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_kmeans_nmi_agrees_with_faiss_and_scikit_learn(seed):
    # Different k-means implementations end in different local optima; on these clusters they stay close.
    x, labels = separated_blobs(seed, noise=0.25)
    ours, faiss_nmi, reference = calc_nmi(x, labels, device="cpu"), calc_nmi(x, labels), sklearn_nmi(x, labels)
    assert 0.8 < reference < 0.99  # neither trivial nor hopeless, so that a broken k-means would show
    assert ours == pytest.approx(faiss_nmi, abs=0.06)
    assert ours == pytest.approx(reference, abs=0.06)


def test_torch_kmeans_separates_clusters_and_fills_empty_ones():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 25)
    x = normalize(np.eye(16)[labels] + 0.05 * rng.normal(size=(len(labels), 16)))
    assert calc_nmi(x, labels, device="cpu") == pytest.approx(1.0)
    # More clusters than distinct points: the empty clusters take over far points instead of staying empty.
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    assignment = torch_kmeans(points, 4, KMeansSchedule(niter=10, nredo=1))
    assert len(torch.unique(assignment)) == 4


@pytest.mark.parametrize(
    "num_items, num_clusters, budget, expected",
    [
        (8_131, 98, 2e11, KMeansSchedule(20, 5)),  # Cars196 test set: the full schedule
        (60_502, 11_316, None, KMeansSchedule(20, 5)),  # no budget (on a GPU)
        (60_502, 11_316, 2e11, None),  # SOP test set on a CPU: not even one iteration fits
        (10_000, 1_000, 2e11, KMeansSchedule(20, 3)),  # 5.1e10 per run of 20 iterations: 3 runs fit
        (10_000, 5_000, 2e11, KMeansSchedule(15, 1)),  # 1.28e10 per iteration: one run of 15 iterations
        (10_000, 20_000, 2e11, None),  # fewer than MIN_ITERATIONS would fit
    ],
)
def test_nmi_schedule_fits_the_budget(num_items, num_clusters, budget, expected):
    schedule = nmi_schedule(num_items, num_clusters, 256, KMeansSchedule(20, 5), budget)
    assert schedule == expected
    if schedule is not None and budget is not None:
        assert kmeans_cost(num_items, num_clusters, 256, schedule) <= budget


def test_nmi_over_budget_is_left_out_with_a_warning():
    x, labels = make_clustered_data(3)
    cost = kmeans_cost(len(x), len(np.unique(labels)), x.shape[1], KMeansSchedule(20, 5))
    with pytest.warns(RuntimeWarning, match="NMI left out"):
        metrics = calc_retrieval_metrics(x, labels, nmi_max_macs=cost / 100)
    assert "nmi" not in metrics and "map@r" in metrics
    within = calc_retrieval_metrics(x, labels, nmi_max_macs=cost)
    assert within["nmi"] == calc_nmi(x, labels)


# ----------------------------------------------------------------------------------------------------------------
# RetrievalMetric


def padded_rank_batches(num_items: int, world_size: int, batch_size: int) -> list[np.ndarray]:
    """Dataset indices as a DistributedSampler without shuffling deals them: padded by repeating from the start."""
    total = -(-num_items // world_size) * world_size
    padded = np.concatenate([np.arange(num_items), np.arange(total - num_items)])
    batches = []
    for rank in range(world_size):
        rank_indices = padded[rank::world_size]
        batches += [rank_indices[i : i + batch_size] for i in range(0, len(rank_indices), batch_size)]
    return batches


def test_retrieval_metric_drops_padding_duplicates():
    x, labels = make_clustered_data(4)
    raw = 3.0 * x  # not normalised: the metric normalises itself
    batches = padded_rank_batches(len(x), world_size=3, batch_size=16)
    assert sum(len(b) for b in batches) > len(x)

    metric = RetrievalMetric(recall_at_k=[1, 2, 4], compute_nmi=True)
    for batch in batches[::-1]:  # order must not matter
        metric.update(torch.from_numpy(raw[batch]), torch.from_numpy(labels[batch]), torch.from_numpy(batch))
    actual = metric.compute()
    assert_metrics_equal(actual, calc_retrieval_metrics(x, labels, recall_at_k=[1, 2, 4]))

    collected = metric.collected()
    np.testing.assert_array_equal(collected.indices, np.arange(len(x)))
    np.testing.assert_array_equal(collected.labels, labels)
    np.testing.assert_allclose(collected.embeddings, x, atol=1e-6)
    assert collected.embeddings.dtype == np.float32


def test_retrieval_metric_under_emulated_ddp():
    # Two ranks, each fed its DistributedSampler share. Rank 0 computes through torchmetrics' real sync code, with
    # an all-gather that returns both ranks' states: afterwards each state is one concatenated tensor.
    x, labels = make_clustered_data(1)
    batches = padded_rank_batches(len(x), world_size=2, batch_size=32)
    rank_batches = [batches[: len(batches) // 2], batches[len(batches) // 2 :]]

    def fill(metric: RetrievalMetric, rank: int) -> RetrievalMetric:
        for batch in rank_batches[rank]:
            metric.update(torch.from_numpy(x[batch]), torch.from_numpy(labels[batch]), torch.from_numpy(batch))
        return metric

    rank1 = fill(RetrievalMetric(recall_at_k=[1, 8], compute_nmi=False), rank=1)
    rank1_states = {name: torch.cat(getattr(rank1, name)) for name in ("embeddings", "labels", "indices")}
    rank0_states = {}

    def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        for name, local in rank0_states.items():
            if local.shape == tensor.shape and torch.equal(local, tensor):
                return [tensor, rank1_states[name]]
        raise AssertionError("unexpected tensor to gather")

    rank0 = RetrievalMetric(
        recall_at_k=[1, 8], compute_nmi=False, dist_sync_fn=all_gather, distributed_available_fn=lambda: True
    )
    fill(rank0, rank=0)
    rank0_states.update({name: torch.cat(getattr(rank0, name)) for name in ("embeddings", "labels", "indices")})

    expected = calc_retrieval_metrics(x, labels, [1, 8], compute_nmi=False)
    assert rank0.compute() == expected
    assert rank1.compute() != expected  # one rank alone sees half the gallery
    with rank0.sync_context(dist_sync_fn=all_gather, distributed_available=lambda: True):
        assert isinstance(rank0.embeddings, torch.Tensor)
        np.testing.assert_array_equal(rank0.collected().indices, np.arange(len(x)))


def test_retrieval_metric_reset_and_low_precision_inputs():
    x, labels = make_clustered_data(0)
    metric = RetrievalMetric(recall_at_k=[1], compute_nmi=False)
    metric.update(torch.randn(5, 16), torch.zeros(5, dtype=torch.int64), torch.arange(5))
    metric.reset()
    metric.update(torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(labels).int(), torch.arange(len(x)))
    metrics = metric.compute()
    assert metrics["num_queries"] == np.sum(count_relevant(labels) > 0)
    assert all(isinstance(value, float) for value in metrics.values())


# ----------------------------------------------------------------------------------------------------------------
# Errors and doctests


@pytest.mark.parametrize(
    ("embeddings", "labels", "kwargs", "message"),
    [
        (np.ones((4, 2)), np.zeros(3), {}, "4 embeddings but 3 labels"),
        (np.ones((1, 2)), np.zeros(1), {}, "at least 2 embeddings"),
        (np.ones(4), np.zeros(4), {}, "2D array"),
        (np.ones((4, 2, 1)), np.zeros(4), {}, "2D array"),
        (np.ones((4, 2)), np.zeros((4, 1)), {}, "labels must be a 1D array"),
        (np.array([[1.0, 0.0], [np.nan, 1.0]]), np.zeros(2), {}, "NaN or infinite"),
        (np.array([[1.0, 0.0], [np.inf, 1.0]]), np.zeros(2), {}, "NaN or infinite"),
        (np.ones((4, 2)), np.zeros(4), {"recall_at_k": (0, 1)}, "every K >= 1"),
        (np.ones((4, 2)), np.zeros(4), {"recall_at_k": ()}, "at least one K"),
        (np.ones((4, 2)), np.zeros(4), {"chunk_size": 0}, "chunk_size must be at least 1"),
    ],
)
def test_bad_input_raises(embeddings, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        calc_retrieval_metrics(embeddings, labels, **kwargs)


def test_bad_neighbor_inputs_raise():
    with pytest.raises(ValueError, match="k must be at least 1"):
        find_neighbors(np.eye(3), k=0)
    with pytest.raises(ValueError, match="R >= 1"):
        calc_r_precision(np.zeros((2, 3)), np.zeros(2), np.array([1, 0]))
    with pytest.raises(ValueError, match="at least max"):
        calc_map_at_r(np.zeros((2, 3)), np.zeros(2), np.array([1, 4]))
    with pytest.raises(ValueError, match="shape"):
        calc_recall_at_k(np.zeros((2, 3)), np.zeros(3), ks=[1])


def test_retrieval_metric_errors():
    metric = RetrievalMetric()
    with pytest.raises(ValueError, match="call update"), pytest.warns(UserWarning):
        metric.compute()
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(4, 2), torch.zeros(3), torch.arange(4))
    metric.update(torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 1]))
    metric.update(torch.eye(2), torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="two different labels"):
        metric.compute()


@pytest.mark.parametrize("module", [retrieval_module, metric_module])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"np": np, "torch": torch})
    assert result.attempted > 0 and result.failed == 0
