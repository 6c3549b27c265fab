"""Queries searched in a separate gallery (DeepFashion In-Shop, query/ + gallery/ folders): the metrics equal a plain
brute-force reference and pytorch-metric-learning's AccuracyCalculator (``ref_includes_query=False``), on random,
tied and duplicated data, on the numba kernel (every screen) and on the torch path that runs on GPUs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metricsearch.metrics import RetrievalMetric, calc_nmi, calc_retrieval_metrics, count_relevant, rank_kernels
from metricsearch.metrics.positive_ranks import rank_positives
from tests.metric_references import (
    SUM_ORDER_TOL,
    assert_metrics_equal,
    assert_no_deciding_gallery_near_ties,
    brute_force_gallery_order,
    make_quantised_data,
    make_query_gallery_data,
    normalize,
    reference_query_gallery_metrics,
)

KS = (1, 2, 4, 8, 16)
# The numba kernel with each screen, and the torch implementation that runs on GPUs (here on the CPU).
PATHS = [{"screen": "float32"}, {"screen": "bfloat16"}, {"screen": "int8"}, {"device": "cpu"}]
PATH_IDS = ["kernel-float32", "kernel-bfloat16", "kernel-int8", "torch"]


def qg_metrics(queries, query_labels, gallery, gallery_labels, ks=KS, **kwargs) -> dict[str, float]:
    return calc_retrieval_metrics(queries, query_labels, recall_at_k=ks, compute_nmi=False,
                                  gallery_embeddings=gallery, gallery_labels=gallery_labels, **kwargs)  # fmt: skip


def make_duplicated_data(seed: int, dim: int = 16):
    """Random queries, and a gallery holding exact copies of some queries (of their class and of other classes),
    several identical items filed under different classes, and ordinary items."""
    rng = np.random.default_rng(seed)
    num_classes = 15
    centers = rng.normal(size=(num_classes, dim))
    query_labels = rng.integers(0, num_classes, 60)
    queries = normalize(centers[query_labels] + 1.0 * rng.normal(size=(60, dim)))
    copied = rng.choice(60, size=30, replace=False)
    copy_labels = np.where(rng.random(30) < 0.5, query_labels[copied], rng.integers(0, num_classes, 30))
    base_labels = rng.integers(0, num_classes, 20)
    base = normalize(centers[base_labels] + 1.0 * rng.normal(size=(20, dim)))
    repeated = np.repeat(np.arange(20), 3)  # each item three times, under its class and two random ones
    repeated_labels = np.where(np.arange(60) % 3 == 0, base_labels[repeated], rng.integers(0, num_classes, 60))
    ordinary_labels = rng.integers(0, num_classes, 40)
    ordinary = normalize(centers[ordinary_labels] + 1.0 * rng.normal(size=(40, dim)))
    gallery = np.concatenate([queries[copied], base[repeated], ordinary])
    gallery_labels = np.concatenate([copy_labels, repeated_labels, ordinary_labels])
    order = rng.permutation(len(gallery))  # copies spread through the gallery, in both index orders
    return queries, query_labels, gallery[order], gallery_labels[order]


def make_quantised_duplicated_data(seed: int):
    """Duplicated data as :func:`make_duplicated_data`, from quantised vectors (exact scores everywhere)."""
    queries, query_labels, gallery, gallery_labels = make_quantised_data(seed, num_queries=50, num_gallery=60)
    rng = np.random.default_rng(seed + 100)
    copied = rng.choice(len(queries), size=25, replace=False)
    copy_labels = np.where(rng.random(25) < 0.5, query_labels[copied], rng.integers(0, 12, 25))
    repeated = np.repeat(gallery[:10], 3, axis=0)
    repeated_labels = rng.integers(0, 12, 30)
    gallery = np.concatenate([gallery, queries[copied], repeated])
    gallery_labels = np.concatenate([gallery_labels, copy_labels, repeated_labels])
    order = rng.permutation(len(gallery))
    return queries, query_labels, gallery[order], gallery_labels[order]


DATA = {
    "random": lambda seed: make_query_gallery_data(seed),
    "quantised": lambda seed: make_quantised_data(seed),
    "duplicated": lambda seed: make_duplicated_data(seed),
    "quantised-duplicated": lambda seed: make_quantised_duplicated_data(seed),
}


# ----------------------------------------------------------------------------------------------------------------
# Against the brute-force reference


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_reference(seed, kind, path):
    queries, query_labels, gallery, gallery_labels = DATA[kind](seed)
    assert_no_deciding_gallery_near_ties(queries, query_labels, gallery, gallery_labels)
    ks = KS + (len(gallery) + 5,)  # a K beyond the gallery: every answerable query is found
    actual = qg_metrics(queries, query_labels, gallery, gallery_labels, ks=ks, chunk_size=16, **path)
    expected = reference_query_gallery_metrics(queries, query_labels, gallery, gallery_labels, ks)
    assert_metrics_equal(actual, expected)
    assert actual[f"recall@{ks[-1]}"] == 1.0


@pytest.mark.parametrize("kind", list(DATA))
def test_the_data_ties_as_intended(kind):
    # The tied and duplicated sets hold exact ties between correct and wrong gallery items (the index rule decides
    # them); the random set holds none.
    queries, query_labels, gallery, gallery_labels = DATA[kind](0)
    scores, order = brute_force_gallery_order(queries, gallery)
    correct = gallery_labels[order] == query_labels[:, None]
    deciding_ties = (np.diff(scores, axis=1) == 0) & (correct[:, 1:] != correct[:, :-1])
    assert deciding_ties.any() == (kind != "random")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(("block_size", "dim"), [(1, 24), (7, 24), (None, 24), (7, 96)])  # 96: the vectorised body
def test_numba_and_torch_paths_give_the_same_ranks(block_size, dim, path):
    # Exact copies everywhere: both paths must tie them exactly and order them by gallery index.
    queries, query_labels, gallery, gallery_labels = make_duplicated_data(3, dim=dim)
    kwargs = {"gallery_embeddings": gallery, "gallery_labels": gallery_labels, "block_size": block_size}
    expected = rank_positives(queries, query_labels, max_k=len(gallery), device="cpu", **kwargs)
    actual = rank_positives(queries, query_labels, max_k=len(gallery), **kwargs, **path)
    np.testing.assert_array_equal(actual.num_relevant, count_relevant(query_labels, gallery_labels))
    answerable = actual.num_relevant > 0
    # max_k = G prunes no first hit; the ranks of positives within each query's top R are exact on every path.
    np.testing.assert_array_equal(actual.first_hit_rank[answerable], expected.first_hit_rank[answerable])
    inside, ranks = actual.positives_within_r()
    inside_expected, ranks_expected = expected.positives_within_r()
    np.testing.assert_array_equal(inside, inside_expected)
    np.testing.assert_array_equal(ranks[inside], ranks_expected[inside_expected])


def test_phase_one_gives_the_same_scores_on_one_thread_and_on_all(monkeypatch):
    # Small batches run on one thread, large ones on all: both must give the scores the counting kernel compares to.
    queries, query_labels, gallery, gallery_labels = make_duplicated_data(2, dim=96)
    kwargs = {"gallery_embeddings": gallery, "gallery_labels": gallery_labels, "max_k": len(gallery)}
    serial = rank_positives(queries, query_labels, **kwargs)
    monkeypatch.setattr(rank_kernels, "PARALLEL_MIN_WORK", 0)
    parallel = rank_positives(queries, query_labels, **kwargs)
    np.testing.assert_array_equal(parallel.negatives_before, serial.negatives_before)
    expected = reference_query_gallery_metrics(queries, query_labels, gallery, gallery_labels, KS)
    assert_metrics_equal(qg_metrics(queries, query_labels, gallery, gallery_labels), expected)


@pytest.mark.parametrize("screen", ["float32", "bfloat16", "int8"])
def test_pruning_keeps_every_deciding_count_exact(screen):
    # Random (untrained-like) embeddings: first hits far down the gallery, so pruning skips most pairs.
    rng = np.random.default_rng(4)
    queries, gallery = normalize(rng.normal(size=(300, 8))), normalize(rng.normal(size=(400, 8)))
    query_labels, gallery_labels = rng.integers(0, 80, 300), rng.integers(0, 90, 400)
    kwargs = {"gallery_embeddings": gallery, "gallery_labels": gallery_labels}
    exact = rank_positives(queries, query_labels, max_k=len(gallery), device="cpu", **kwargs)
    for max_k in (1, 4, 50):
        pruned = rank_positives(queries, query_labels, max_k=max_k, block_size=37, screen=screen, **kwargs)
        np.testing.assert_array_equal(
            np.minimum(pruned.first_hit_rank, max_k)[pruned.num_relevant > 0],
            np.minimum(exact.first_hit_rank, max_k)[exact.num_relevant > 0],
        )
        inside, ranks = pruned.positives_within_r()
        inside_expected, ranks_expected = exact.positives_within_r()
        np.testing.assert_array_equal(inside, inside_expected)
        np.testing.assert_array_equal(ranks[inside], ranks_expected[inside_expected])


# ----------------------------------------------------------------------------------------------------------------
# Hand-made cases

E1, E2, E3 = np.eye(3, dtype=np.float32)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_an_exact_copy_of_the_query_in_the_gallery_is_a_real_neighbour(path):
    # The gallery holds the query itself (of its class), and nothing else of its class.
    queries, query_labels = np.stack([E1]), np.array([0])
    gallery, gallery_labels = np.stack([normalize([E1 + E2])[0], E1, E3]), np.array([1, 0, 2])
    expected = {"recall@1": 1.0, "recall@2": 1.0, "precision@1": 1.0, "r_precision": 1.0, "map@r": 1.0,
                "num_queries": 1.0, "num_queries_left_out": 0.0}  # fmt: skip
    assert qg_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 2), **path) == expected


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("copy_first", [True, False])
def test_identical_gallery_items_of_two_classes_tie_by_gallery_index(copy_first, path):
    # Gallery items 0 and 1 are the same vector, one of the query's class and one of another class; the query's
    # second classmate is less similar. Whichever has the lower gallery index comes first.
    p, s = normalize([E1 + 0.5 * E2])[0], normalize([E1 + 2 * E2])[0]
    queries, query_labels = np.stack([E1]), np.array([0])
    gallery = np.stack([p, p, s, E3])
    gallery_labels = np.array([1, 0, 0, 2]) if copy_first else np.array([0, 1, 0, 2])
    metrics = qg_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 2), **path)
    if copy_first:  # wrong, right, right: R = 2, one hit within 2, AP@R = (1/2) / 2
        expected = {"recall@1": 0.0, "recall@2": 1.0, "precision@1": 0.0, "r_precision": 0.5, "map@r": 0.25}
    else:  # right, wrong, right
        expected = {"recall@1": 1.0, "recall@2": 1.0, "precision@1": 1.0, "r_precision": 0.5, "map@r": 0.5}
    assert metrics == {**expected, "num_queries": 1.0, "num_queries_left_out": 0.0}


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_queries_whose_class_is_not_in_the_gallery_are_excluded_and_counted(path):
    queries, query_labels, gallery, gallery_labels = make_query_gallery_data(5)
    missing = count_relevant(query_labels, gallery_labels) == 0
    assert 0 < missing.sum() < len(queries)
    metrics = qg_metrics(queries, query_labels, gallery, gallery_labels, **path)
    assert metrics["num_queries"] == len(queries) - missing.sum()
    assert metrics.pop("num_queries_left_out") == missing.sum()
    kept = qg_metrics(queries[~missing], query_labels[~missing], gallery, gallery_labels, **path)
    assert kept.pop("num_queries_left_out") == 0.0
    assert metrics == kept


def test_no_answerable_query_gives_zeros_with_a_warning():
    with pytest.warns(RuntimeWarning, match="No query has a gallery item of its class"):
        metrics = qg_metrics(np.stack([E1, E2]), np.array([0, 1]), np.stack([E1, E3]), np.array([2, 3]), ks=(1,))
    assert metrics == {"recall@1": 0.0, "precision@1": 0.0, "r_precision": 0.0, "map@r": 0.0, "num_queries": 0.0,
                       "num_queries_left_out": 2.0}  # fmt: skip


def test_one_query_and_one_gallery_item_are_enough():
    assert qg_metrics(np.stack([E1]), np.array([4]), np.stack([E2]), np.array([4]), ks=(1,))["recall@1"] == 1.0


def test_nmi_clusters_the_query_embeddings():
    queries, query_labels, gallery, gallery_labels = make_query_gallery_data(2)
    metrics = calc_retrieval_metrics(queries, query_labels, gallery_embeddings=gallery, gallery_labels=gallery_labels)
    assert metrics["nmi"] == calc_nmi(queries, query_labels)


def test_the_self_search_is_what_it_was_without_a_gallery():
    # A gallery of the other items only is what the self-search searches for a single query.
    queries, query_labels, gallery, gallery_labels = make_query_gallery_data(1)
    x, labels = np.concatenate([queries[:1], gallery]), np.concatenate([query_labels[:1], gallery_labels])
    ranks = rank_positives(x, labels, max_k=len(x), device="cpu")
    alone = rank_positives(queries[:1], query_labels[:1], max_k=len(x), gallery_embeddings=gallery,
                           gallery_labels=gallery_labels)  # fmt: skip
    assert ranks.num_relevant[0] == alone.num_relevant[0] > 0
    assert ranks.first_hit_rank[0] == alone.first_hit_rank[0]


# ----------------------------------------------------------------------------------------------------------------
# Against pytorch-metric-learning


def pml_metrics(queries, query_labels, gallery, gallery_labels, ks) -> dict[str, float]:
    """AccuracyCalculator with ``ref_includes_query=False`` for Precision@1, R-Precision and MAP@R (its default
    k-NN: faiss' exact L2 search, which returns exact ties in index order); it has no Recall@K for K > 1, so that
    comes from the same k-NN search (Recall@1 is its precision_at_1)."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    q, g = torch.from_numpy(queries), torch.from_numpy(gallery)
    ql, gl = torch.from_numpy(query_labels), torch.from_numpy(gallery_labels)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    expected = calculator.get_accuracy(q, ql, g, gl, ref_includes_query=False)
    _, knn = FaissKNN()(q, len(gallery), g, False)
    correct = (gl[knn] == ql[:, None]).numpy()
    # Where faiss' float32 scores order a correct and a wrong item otherwise than the exact scores (a near-tie, or
    # exact copies rounded differently by its BLAS), the two would differ for a reason outside this code.
    _, order = brute_force_gallery_order(queries, gallery)
    assert np.array_equal(correct, gallery_labels[order] == query_labels[:, None]), "faiss orders this data otherwise"
    correct = correct[count_relevant(query_labels, gallery_labels) > 0]
    out = {f"recall@{k}": float(correct[:, :k].any(axis=1).mean()) for k in ks}
    out.update(
        {
            "precision@1": expected["precision_at_1"],
            "r_precision": expected["r_precision"],
            "map@r": expected["mean_average_precision_at_r"],
        }
    )
    return out


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pytorch_metric_learning(seed, kind):
    queries, query_labels, gallery, gallery_labels = DATA[kind](seed)
    expected = pml_metrics(queries, query_labels, gallery, gallery_labels, KS)
    actual = qg_metrics(queries, query_labels, gallery, gallery_labels)
    assert actual.pop("num_queries") == np.sum(count_relevant(query_labels, gallery_labels) > 0)
    assert actual.pop("num_queries_left_out") == np.sum(count_relevant(query_labels, gallery_labels) == 0)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=SUM_ORDER_TOL), key


# ----------------------------------------------------------------------------------------------------------------
# RetrievalMetric with num_queries


def test_retrieval_metric_splits_queries_and_gallery_by_dataset_index():
    queries, query_labels, gallery, gallery_labels = make_query_gallery_data(6)
    x = np.concatenate([queries, gallery]) * 2.5  # not normalised: the metric normalises itself
    labels = np.concatenate([query_labels, gallery_labels])
    # Two DDP ranks' shares, padded by repeating the first indices, fed in a scrambled order.
    total = -(-len(x) // 2) * 2
    padded = np.concatenate([np.arange(len(x)), np.arange(total - len(x))])
    batches = [padded[rank::2][i : i + 16] for rank in range(2) for i in range(0, total // 2, 16)]
    metric = RetrievalMetric(recall_at_k=KS, compute_nmi=False, num_queries=len(queries))
    for batch in batches[::-1]:
        metric.update(torch.from_numpy(x[batch]), torch.from_numpy(labels[batch]), torch.from_numpy(batch))
    expected = qg_metrics(queries, query_labels, gallery, gallery_labels)
    assert_metrics_equal(metric.compute(), expected)

    query_part, gallery_part = metric.split_queries()
    np.testing.assert_array_equal(query_part.indices, np.arange(len(queries)))
    np.testing.assert_array_equal(gallery_part.indices, len(queries) + np.arange(len(gallery)))
    np.testing.assert_array_equal(gallery_part.labels, gallery_labels)
    np.testing.assert_allclose(gallery_part.embeddings, gallery, atol=1e-6)
    assert len(metric.collected().indices) == len(x)  # collected() still returns everything

    # Changing the split after compute() recomputes (torchmetrics would otherwise return its cached result).
    metric.num_queries = None
    assert metric.compute()["num_queries"] == np.sum(count_relevant(labels) > 0)


def test_retrieval_metric_split_errors():
    metric = RetrievalMetric(recall_at_k=[1], compute_nmi=False, num_queries=10)
    metric.update(torch.eye(3), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="no gallery collected with num_queries=10"):
        metric.compute()
    with pytest.raises(ValueError, match="num_queries must be None or a positive integer, got 0"):
        metric.num_queries = 0
    with pytest.raises(ValueError, match="num_queries is None"):
        RetrievalMetric().split_queries()


# ----------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("gallery", "gallery_labels", "message"),
    [
        (np.ones((4, 3)), np.zeros(4), "gallery_embeddings have 3 dimensions but the query embeddings 2"),
        (np.ones((4, 2)), np.zeros(3), "got 4 gallery_embeddings but 3 gallery_labels"),
        (np.ones((4, 2)), None, "gallery_labels missing"),
        (None, np.zeros(4), "gallery_embeddings missing"),
        (np.ones((0, 2)), np.zeros(0), "need at least 1 gallery_embeddings"),
        (np.ones(4), np.zeros(4), "gallery_embeddings must be a 2D array"),
        (np.ones((4, 2)), np.zeros((4, 1)), "gallery_labels must be a 1D array"),
        (np.array([[1.0, np.nan]]), np.zeros(1), "gallery_embeddings contain NaN"),
    ],
)
def test_bad_gallery_raises_a_one_line_error(gallery, gallery_labels, message):
    with pytest.raises(ValueError, match=message) as error:
        calc_retrieval_metrics(np.ones((3, 2)), np.zeros(3), gallery_embeddings=gallery, gallery_labels=gallery_labels)
    assert "\n" not in str(error.value)


def test_bad_queries_raise_a_one_line_error():
    for queries, labels, message in [
        (np.ones((3, 2)), np.zeros(2), "got 3 embeddings but 2 labels"),
        (np.ones((0, 2)), np.zeros(0), "need at least 1 embeddings"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            calc_retrieval_metrics(queries, labels, gallery_embeddings=np.ones((2, 2)), gallery_labels=np.zeros(2))
        assert "\n" not in str(error.value)
