"""FNMR@FMR and the ROC / DET curve against a brute force over every pair."""

import numpy as np
import pytest

from metricsearch.metrics.verification import calc_fnmr_at_fmr, calc_verification


def brute_force_pairs(x, labels, gallery=None, gallery_labels=None):
    """Every pair's float32 score and kind, listed one by one."""
    genuine, impostor = [], []
    if gallery is None:
        for i in range(len(x)):
            for j in range(i + 1, len(x)):
                score = np.float32(np.dot(x[i].astype(np.float64), x[j].astype(np.float64)))
                (genuine if labels[i] == labels[j] else impostor).append(score)
    else:
        for i in range(len(x)):
            for j in range(len(gallery)):
                score = np.float32(np.dot(x[i].astype(np.float64), gallery[j].astype(np.float64)))
                (genuine if labels[i] == gallery_labels[j] else impostor).append(score)
    return np.array(genuine, dtype=np.float32), np.array(impostor, dtype=np.float32)


def brute_force_fnmr(genuine, impostor, fmr):
    """Lowest threshold t (an impostor score, or -inf) with #(impostor > t) <= fmr * n; FNMR = #(genuine <= t)."""
    allowed = int(np.floor(fmr * len(impostor)))
    for t in np.concatenate([[-np.inf], np.sort(np.unique(impostor))]):
        if np.count_nonzero(impostor > t) <= allowed:
            accepted = np.count_nonzero(impostor > t) / len(impostor)
            return float(t), accepted, np.count_nonzero(genuine <= t) / len(genuine)
    raise AssertionError("unreachable: the highest impostor score always qualifies")


def exact_grid_embeddings(rng, n, dim, num_classes):
    """Coordinates that are multiples of 1/8 in [-1, 1]: every inner product is exact in float32, in any order of
    summation, so the blocked product and the brute force agree bit for bit and many pairs tie."""
    x = rng.integers(-8, 9, size=(n, dim)).astype(np.float32) / 8
    labels = rng.integers(0, num_classes, size=n)
    return x, labels


@pytest.mark.parametrize("block_elements", [7, 64, 1 << 20])
@pytest.mark.parametrize("targets", [(0.1, 0.01, 0.001), (0.5, 0.25), (1.0,)])
def test_fnmr_equals_brute_force_on_exact_scores_with_ties(block_elements, targets):
    rng = np.random.default_rng(0)
    x, labels = exact_grid_embeddings(rng, 90, 3, 6)
    genuine, impostor = brute_force_pairs(x, labels)
    curve = calc_verification(x, labels, targets, block_elements=block_elements)
    assert (curve.num_genuine, curve.num_impostor) == (len(genuine), len(impostor))
    for point, target in zip(curve.operating_points, targets, strict=True):
        threshold, fmr, fnmr = brute_force_fnmr(genuine, impostor, target)
        assert point["threshold"] == threshold
        assert point["fmr"] == pytest.approx(fmr, abs=0) and point["fmr"] <= target
        assert point["fnmr"] == pytest.approx(fnmr, abs=0)


def test_fnmr_with_a_separate_gallery_equals_brute_force():
    rng = np.random.default_rng(1)
    x, labels = exact_grid_embeddings(rng, 40, 4, 5)
    gallery, gallery_labels = exact_grid_embeddings(rng, 55, 4, 5)
    genuine, impostor = brute_force_pairs(x, labels, gallery, gallery_labels)
    curve = calc_verification(x, labels, (0.1, 0.01), gallery_embeddings=gallery, gallery_labels=gallery_labels,
                              block_elements=100)  # fmt: skip
    assert (curve.num_genuine, curve.num_impostor) == (len(genuine), len(impostor))
    for point in curve.operating_points:
        _, fmr, fnmr = brute_force_fnmr(genuine, impostor, point["fmr_target"])
        assert (point["fmr"], point["fnmr"]) == (fmr, fnmr)


def test_curve_points_equal_brute_force_rates_at_their_thresholds():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=120)
    x[labels == 3] = x[labels == 3][0]  # a class of exact copies: genuine scores of 1.0, tied
    genuine, impostor = brute_force_pairs(x, labels)
    curve = calc_verification(x, labels, block_elements=500)
    assert np.all(np.diff(curve.thresholds) > 0)
    assert np.all(np.diff(curve.fmr) <= 0) and np.all(np.diff(curve.fnmr) >= 0)
    # The blocked float32 product may round a score 1 ulp away from the float64 brute force; thresholds are bin
    # edges, so only a score within 1 ulp of an edge could change side.
    for t, fmr, fnmr in zip(curve.thresholds[::7], curve.fmr[::7], curve.fnmr[::7], strict=True):
        assert fmr == pytest.approx(np.count_nonzero(impostor >= t) / len(impostor), abs=2 / len(impostor))
        assert fnmr == pytest.approx(np.count_nonzero(genuine < t) / len(genuine), abs=2 / len(genuine))
    assert (curve.fmr[-1], curve.fnmr[-1]) == (0.0, 1.0)


def test_perfect_separation_gives_zero_fnmr_and_flat_dict_names_targets():
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [-1, 0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    result = calc_fnmr_at_fmr(x, labels, (0.1, 0.001))
    assert result == {"fnmr@fmr=0.1": 0.0, "fnmr@fmr=0.001": 0.0}


def test_sets_without_both_kinds_of_pair_and_bad_targets_are_refused():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="no genuine"):
        calc_verification(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="no impostor"):
        calc_verification(x, np.array([0, 0, 0]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        calc_verification(x, np.array([0, 0, 1]), (0.0,))
    with pytest.raises(ValueError, match="finite"):
        calc_verification(np.full((3, 2), np.nan, dtype=np.float32), np.array([0, 0, 1]))
