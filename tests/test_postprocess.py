"""Query expansion, database-side augmentation and k-reciprocal re-ranking against plain reference computations."""

import numpy as np
import pytest

from metricsearch.metrics import calc_retrieval_metrics
from metricsearch.metrics.postprocess import (
    KReciprocalParams,
    augment_database,
    calc_postprocessed_metrics,
    expand_queries,
    k_reciprocal_scores,
    rank_positives_from_scores,
)
from metricsearch.metrics.retrieval import calc_metrics_from_positive_ranks
from tests.metric_references import make_clustered_data, make_query_gallery_data, normalize


def reference_expansion(queries, gallery, k, alpha, same_set):
    """One query at a time: its k most similar gallery rows (not itself), weighted by max(s, 0)^alpha."""
    out = []
    for i, q in enumerate(queries.astype(np.float64)):
        scores = gallery.astype(np.float64) @ q
        if same_set:
            scores[i] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        v = q + sum(max(scores[j], 0.0) ** alpha * gallery[j].astype(np.float64) for j in top)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def reference_k_reciprocal(queries, gallery, k1, k2, lam):
    """The paper's algorithm with dense matrices and loops: final distance of every query x gallery pair."""
    joint = queries if gallery is None else np.concatenate([queries, gallery])
    joint = joint.astype(np.float64)
    n, m = len(queries), len(joint)
    dist = np.maximum(2 - 2 * joint @ joint.T, 0)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        return np.array([j for j in forward if i in rank[j, : k + 1]])

    v = np.zeros((m, m))
    for i in range(m):
        members = reciprocal(i, k1)
        expanded = list(members)
        for c in members:
            candidate = reciprocal(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(candidate, members)) > 2 / 3 * len(candidate):
                expanded += list(candidate)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        v[i, expanded] = w / w.sum()
    if k2 > 1:
        v = np.array([v[rank[i, :k2]].mean(axis=0) for i in range(m)])
    offset = 0 if gallery is None else n
    final = np.zeros((n, m - offset))
    for q in range(n):
        for g in range(m - offset):
            both = np.minimum(v[q], v[offset + g]).sum()
            jaccard = 1 - both / np.maximum(v[q], v[offset + g]).sum()
            final[q, g] = (1 - lam) * jaccard + lam * dist[q, offset + g]
    return final


def reference_metrics_from_scores(scores, labels, gallery_labels, same_set, ks):
    """By definition, one query at a time, stable order (equal scores by gallery index), own row skipped."""
    hits, rps, aps = dict.fromkeys(ks, 0), [], []
    for q in range(len(scores)):
        order = [g for g in np.argsort(-scores[q], kind="stable") if not (same_set and g == q)]
        correct = [gallery_labels[g] == labels[q] for g in order]
        r = sum(correct)
        if r == 0:
            continue
        for k in ks:
            hits[k] += any(correct[:k])
        rps.append(sum(correct[:r]) / r)
        aps.append(sum(sum(correct[: i + 1]) / (i + 1) for i in range(r) if correct[i]) / r)
    metrics = {f"recall@{k}": hits[k] / len(rps) for k in ks}
    metrics.update({"precision@1": hits[1] / len(rps), "r_precision": np.mean(rps), "map@r": np.mean(aps)})
    metrics["num_queries"] = float(len(rps))
    return metrics


def assert_close_metrics(actual, expected, tolerance=1e-12):
    assert set(expected) <= set(actual)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=tolerance), key


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_query_expansion_and_dba_equal_the_reference(alpha):
    x, _ = make_clustered_data(0, num_classes=20)
    queries, gallery = x[:30], x[30:]
    np.testing.assert_allclose(expand_queries(x, None, 3, alpha), reference_expansion(x, x, 3, alpha, True), atol=1e-6)
    np.testing.assert_allclose(
        expand_queries(queries, gallery, 2, alpha), reference_expansion(queries, gallery, 2, alpha, False), atol=1e-6
    )
    augmented = reference_expansion(gallery, gallery, 4, alpha, True)
    np.testing.assert_allclose(augment_database(gallery, 4, alpha), augmented, atol=1e-6)


@pytest.mark.parametrize("same_set", [True, False])
def test_k_reciprocal_distances_equal_the_dense_reference(same_set):
    rng = np.random.default_rng(3)
    x = normalize(rng.normal(size=(70, 8)))
    queries, gallery = (x, None) if same_set else (x[:25], x[25:])
    expected = reference_k_reciprocal(queries, gallery, k1=6, k2=3, lam=0.3)
    blocks = list(k_reciprocal_scores(queries, gallery, KReciprocalParams(k1=6, k2=3, lambda_value=0.3), block_rows=9))
    actual = -np.concatenate([scores for _, scores in blocks])
    if same_set:
        np.fill_diagonal(expected, np.inf)  # a query's own column is excluded (-inf score)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_ranks_from_scores_equal_the_exact_evaluation_with_duplicates():
    x, labels = make_clustered_data(4, num_classes=25)
    x[5] = x[6]  # exact copies tie and must be ordered by index
    x[labels == labels[9]] = x[9]
    plain = calc_retrieval_metrics(x, labels, recall_at_k=(1, 2, 4), compute_nmi=False)
    via_scores = calc_postprocessed_metrics(x, labels, "none", (1, 2, 4))
    assert via_scores == plain
    scores = (x.astype(np.float64) @ x.T.astype(np.float64)).astype(np.float32).astype(np.float64)
    np.fill_diagonal(scores, -np.inf)
    ranks = rank_positives_from_scores(iter([(slice(0, len(x)), scores)]), labels)
    from_scores = calc_metrics_from_positive_ranks(ranks, (1, 2, 4), ranks.num_relevant > 0)
    assert_close_metrics(from_scores, {k: v for k, v in plain.items() if not k.startswith("num_queries")})


@pytest.mark.parametrize("method", ["aqe", "dba", "k_reciprocal"])
def test_postprocessed_metrics_equal_metrics_of_the_reference_scores(method):
    x, labels = make_clustered_data(5, num_classes=18)
    ks = (1, 2, 4)
    if method == "aqe":
        expanded = reference_expansion(x, x, 2, 3.0, True)
        scores = expanded @ x.T.astype(np.float64)
    elif method == "dba":
        augmented = reference_expansion(x, x, 2, 3.0, True)
        scores = augmented @ augmented.T
    else:
        scores = -reference_k_reciprocal(x, None, 20, 6, 0.3)
    expected = reference_metrics_from_scores(scores, labels, labels, True, ks)
    assert_close_metrics(calc_postprocessed_metrics(x, labels, method, ks), expected)


@pytest.mark.parametrize("method", ["aqe", "dba", "k_reciprocal"])
def test_postprocessed_query_gallery_metrics_equal_the_reference(method):
    queries, query_labels, gallery, gallery_labels = make_query_gallery_data(6, num_classes=12)
    ks = (1, 4)
    if method == "aqe":
        scores = reference_expansion(queries, gallery, 2, 3.0, False) @ gallery.T.astype(np.float64)
    elif method == "dba":
        scores = queries.astype(np.float64) @ reference_expansion(gallery, gallery, 2, 3.0, True).T
    else:
        scores = -reference_k_reciprocal(queries, gallery, 20, 6, 0.3)
    expected = reference_metrics_from_scores(scores, query_labels, gallery_labels, False, ks)
    actual = calc_postprocessed_metrics(queries, query_labels, method, ks, gallery_embeddings=gallery,
                                        gallery_labels=gallery_labels)  # fmt: skip
    assert_close_metrics(actual, expected)


def test_bad_settings_are_refused():
    x, labels = make_clustered_data(7, num_classes=5)
    with pytest.raises(ValueError, match="postprocess must be one of"):
        calc_postprocessed_metrics(x, labels, "rerank")
    with pytest.raises(ValueError, match="k must be at least 1"):
        expand_queries(x, None, 0)
    with pytest.raises(ValueError, match="lambda"):
        KReciprocalParams(lambda_value=1.5)


def test_neighbours_of_negative_similarity_get_no_weight():
    angles = np.deg2rad([0.0, 120.0, 240.0, 10.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    # Query 0's neighbours: item 3 (cos 10 deg) and items 1, 2 (cos 120 deg = -0.5): only item 3 contributes.
    expanded = expand_queries(x, None, k=3, alpha=1.0)
    expected = x[0] + np.cos(np.deg2rad(10.0)) * x[3]
    np.testing.assert_allclose(expanded[0], expected / np.linalg.norm(expected), atol=1e-6)
    np.testing.assert_allclose(expanded, reference_expansion(x, x, 3, 1.0, True), atol=1e-6)


def test_retrieval_metric_reports_postprocessed_and_verification_metrics():
    import torch

    from metricsearch.metrics import RetrievalMetric
    from metricsearch.metrics.postprocess import PostprocessSettings
    from metricsearch.metrics.verification import calc_fnmr_at_fmr

    x, labels = make_clustered_data(8, num_classes=15)
    settings = PostprocessSettings.from_mapping({"method": "k_reciprocal", "k1": 5, "k2": 2, "lambda": 0.5})
    metric = RetrievalMetric(recall_at_k=(1, 2), seed=0, postprocess=settings, verification_fmrs=(0.1, 0.01))
    metric.update(torch.from_numpy(x), torch.from_numpy(labels), torch.arange(len(x)))
    result = metric.compute()
    plain = calc_retrieval_metrics(x, labels, recall_at_k=(1, 2), seed=0)
    expected = calc_postprocessed_metrics(x, labels, "k_reciprocal", (1, 2), k_reciprocal=KReciprocalParams(5, 2, 0.5))
    assert_close_metrics(result, expected)
    assert result["nmi"] == plain["nmi"]  # clustering is of the embeddings as they are
    assert result["map@r"] != plain["map@r"]  # the re-ranking changed the ranking on this data
    for key, value in calc_fnmr_at_fmr(x, labels, (0.1, 0.01)).items():
        assert result[key] == value
    assert metric.last_verification is not None and metric.last_verification.num_genuine > 0


def test_unknown_postprocess_settings_are_refused_by_name():
    from metricsearch.metrics.postprocess import PostprocessSettings

    with pytest.raises(ValueError, match="unknown keys"):
        PostprocessSettings.from_mapping({"method": "aqe", "beta": 1})
    with pytest.raises(ValueError, match="one of none, aqe, dba, k_reciprocal"):
        PostprocessSettings.from_mapping({"method": "qe"})


def test_training_run_reports_postprocessed_test_metrics_and_draws_the_verification_curve(tmp_path, data_dir):
    import json

    from tests.helpers import run_train

    run_dir = tmp_path / "run"
    result = run_train(["postprocess=dba", "module.postprocess.k=3", "save_test_embeddings=true"], run_dir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    test_metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]["test"]
    saved = np.load(run_dir / "test_embeddings.npz")
    expected = calc_postprocessed_metrics(saved["embeddings"], saved["labels"], "dba", (1, 2, 4, 8), k=3)
    # metrics.json holds the values Lightning logged, as float32.
    expected = {key: value for key, value in expected.items() if key != "num_queries"}
    assert_close_metrics(test_metrics, expected, tolerance=1e-7)
    assert {"fnmr@fmr=0.1", "fnmr@fmr=0.01", "fnmr@fmr=0.001"} <= set(test_metrics)
    assert (run_dir / "plots" / "verification_test.png").stat().st_size > 0
    assert (run_dir / "tables" / "verification_test.csv").read_text().startswith("threshold,fmr,fnmr")
