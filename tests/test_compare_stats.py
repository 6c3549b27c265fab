"""The statistics of the loss comparison against plain references, and the test embeddings a run saves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hydra.utils import instantiate
from scipy import stats

from metricsearch.analysis.compare import (
    concatenated_metrics,
    indistinguishable_from_best,
    mean_ci,
    welch_test,
)
from metricsearch.analysis.run_folder import TEST_EMBEDDINGS_FILE, load_embeddings, save_embeddings
from metricsearch.metrics.metric import CollectedEmbeddings
from metricsearch.metrics.retrieval import calc_retrieval_metrics
from metricsearch.pipelines.train import train
from tests.helpers import compose_config


def test_mean_ci_is_the_student_t_interval():
    values = [0.61, 0.58, 0.65, 0.60]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = stats.t.ppf(0.975, n - 1)
    assert t == pytest.approx(3.182446, abs=1e-6)  # the tabulated two-sided 95% quantile at 3 degrees of freedom

    got = mean_ci(values)
    assert got == pytest.approx((mean, mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)), rel=1e-12)
    low90, high90 = mean_ci(values, confidence=0.9)[1:]
    assert got[1] < low90 < mean < high90 < got[2]


def test_mean_ci_of_one_value_has_no_interval_and_of_none_is_refused():
    mean, low, high = mean_ci([0.42])
    assert mean == 0.42 and math.isnan(low) and math.isnan(high)
    assert mean_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])


def test_welch_p_value_follows_welch_satterthwaite():
    a = [0.61, 0.58, 0.65, 0.60, 0.63]
    b = [0.55, 0.59, 0.52, 0.57]

    def mean_and_variance(x):
        m = sum(x) / len(x)
        return m, sum((v - m) ** 2 for v in x) / (len(x) - 1)

    (ma, va), (mb, vb) = mean_and_variance(a), mean_and_variance(b)
    sa, sb = va / len(a), vb / len(b)
    t = (ma - mb) / math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    expected = 2 * stats.t.sf(abs(t), df)

    assert welch_test(a, b) == pytest.approx(expected, rel=1e-10)
    assert welch_test(b, a) == pytest.approx(expected, rel=1e-10)
    assert 0 < expected < 0.05


def test_welch_on_constant_samples_gives_a_number_not_nan():
    assert welch_test([0.5, 0.5, 0.5], [0.5, 0.5]) == 1.0
    assert welch_test([0.5, 0.5], [0.6, 0.6]) == 0.0
    assert 0 < welch_test([0.5, 0.5, 0.5], [0.4, 0.5, 0.6]) <= 1
    with pytest.raises(ValueError, match="at least two values per sample"):
        welch_test([0.5], [0.4, 0.6])


def test_indistinguishable_marks_the_best_and_those_close_to_it():
    samples = {
        "close": [0.59, 0.62, 0.60, 0.61],
        "best": [0.60, 0.62, 0.61, 0.63],
        "worse": [0.40, 0.41, 0.39, 0.42],
        "steady": [0.61, 0.61, 0.61, 0.61],  # near the best, without variance
    }
    marks = indistinguishable_from_best(samples)
    assert marks == {"close": True, "best": True, "worse": False, "steady": True}
    assert list(marks) == list(samples)
    # The mark is p >= alpha: a level above the worse loss's p-value keeps it out, one below lets it in.
    p_worse = welch_test(samples["worse"], samples["best"])
    assert indistinguishable_from_best(samples, alpha=p_worse / 2)["worse"] is True
    assert indistinguishable_from_best({}) == {}
    assert indistinguishable_from_best({"only": [0.5, 0.6]}) == {"only": True}


def brute_force_metrics(embeddings: np.ndarray, labels: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Leave-one-out retrieval by cosine similarity, written out query by query (the standard protocol)."""
    z = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    hits_at = {k: [] for k in ks}
    average_precisions, r_precisions = [], []
    for q in range(len(z)):
        others = [i for i in range(len(z)) if i != q]
        similarity = [float(z[q] @ z[i]) for i in others]
        ranked = [others[j] for j in sorted(range(len(others)), key=lambda j: -similarity[j])]
        correct = [labels[i] == labels[q] for i in ranked]
        r = sum(correct)
        if r == 0:
            continue
        for k in ks:
            hits_at[k].append(any(correct[:k]))
        precision_sum = sum(sum(correct[:i]) / i for i in range(1, r + 1) if correct[i - 1])
        average_precisions.append(precision_sum / r)
        r_precisions.append(sum(correct[:r]) / r)
    result = {f"recall@{k}": float(np.mean(hits_at[k])) for k in ks}
    result["map@r"] = float(np.mean(average_precisions))
    result["r_precision"] = float(np.mean(r_precisions))
    return result


def write_model(path, embeddings, labels, indices=None):
    indices = np.arange(len(labels)) if indices is None else indices
    save_embeddings(path, CollectedEmbeddings(embeddings.astype(np.float32), labels, indices))
    return path


def test_concatenated_metrics_equal_a_brute_force_search_over_the_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5)
    labels[-1] = 99  # a singleton class: its query cannot be answered and is left out
    # Three models of different widths and scales, each a noisy view of the classes.
    centres = rng.normal(size=(100, 8))
    models = [
        (centres[labels] + rng.normal(scale=s, size=(len(labels), 8)))[:, :d] * w
        for s, d, w in [(1.5, 8, 3.0), (1.0, 5, 0.2), (2.0, 7, 1.0)]
    ]
    paths = [write_model(tmp_path / f"m{i}.npz", x, labels) for i, x in enumerate(models)]

    got = concatenated_metrics(paths, recall_at_k=[1, 2, 4])
    normalised = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in models]
    expected = brute_force_metrics(np.concatenate(normalised, axis=1), labels, [1, 2, 4])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["num_queries"] == len(labels) - 1
    # One model alone is that model's own metrics.
    single = brute_force_metrics(models[1], labels, [1])
    assert concatenated_metrics(paths[1:2], [1])["map@r"] == pytest.approx(single["map@r"], abs=1e-9)


def test_models_tested_on_other_images_are_not_concatenated(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 4)
    x = rng.normal(size=(12, 4))
    first = write_model(tmp_path / "a.npz", x, labels)
    other_labels = write_model(tmp_path / "b.npz", x, labels[::-1].copy())
    other_indices = write_model(tmp_path / "c.npz", x, labels, np.arange(12) + 1)
    shorter = write_model(tmp_path / "d.npz", x[:-1], labels[:-1], np.arange(11))
    for path in (other_labels, other_indices, shorter):
        with pytest.raises(ValueError, match=f"{path.name} was tested on other images than .*a.npz"):
            concatenated_metrics([first, path], [1])
    with pytest.raises(ValueError, match="at least one model"):
        concatenated_metrics([], [1])
    np.savez(tmp_path / "e.npz", embeddings=x)
    with pytest.raises(ValueError, match="has no labels, indices array"):
        concatenated_metrics([tmp_path / "e.npz"], [1])


def test_a_run_saves_its_test_embeddings_and_they_give_its_test_metrics(tmp_path, data_dir):
    cfg = compose_config(
        ["save_test_embeddings=true", "module.compute_nmi=false", "test_untrained=false"], tmp_path, data_dir
    )
    train(cfg)

    saved = load_embeddings(tmp_path / TEST_EMBEDDINGS_FILE)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    test_labels = datamodule.split.test.labels
    assert saved.embeddings.dtype == np.float32 and saved.embeddings.shape == (len(test_labels), 16)
    assert saved.labels.dtype == np.int64 and saved.indices.dtype == np.int64
    # One row per test image, in dataset order.
    assert saved.indices.tolist() == list(range(len(test_labels)))
    assert saved.labels.tolist() == test_labels.tolist()

    reported = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["test"]
    recomputed = calc_retrieval_metrics(saved.embeddings, saved.labels, [1], compute_nmi=False)
    # metrics.json holds the logged value, a float32.
    assert np.float32(recomputed["recall@1"]) == np.float32(reported["recall@1"])
    assert concatenated_metrics([tmp_path / TEST_EMBEDDINGS_FILE], [1])["map@r"] == pytest.approx(reported["map@r"])
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing left of the atomic write


def test_runs_write_no_embeddings_unless_asked(tmp_path, data_dir):
    cfg = compose_config(["module.compute_nmi=false", "test_untrained=false"], tmp_path, data_dir)
    assert cfg.save_test_embeddings is False
    train(cfg)
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / TEST_EMBEDDINGS_FILE).exists()
