"""The blocked positive-rank evaluation equals a plain neighbour-list reference, on the CPU kernel and the torch path.

The torch path is what runs on a GPU; running it on the CPU here checks the same code. Exact ties between a
query's positive and a negative (duplicate images filed under two classes) are where the two could disagree, so
they get cases of their own.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from metricsearch.metrics import calc_retrieval_metrics
from metricsearch.metrics import screen as screens
from metricsearch.metrics.positive_ranks import rank_positives
from metricsearch.metrics.rank_kernels import numba_available
from metricsearch.metrics.screen import screen_keys, screen_margin
from tests.metric_references import assert_metrics_equal, make_clustered_data, normalize, reference_metrics

KS = (1, 2, 4, 8, 16, 1000)
# The numba kernel with each screen, and the torch implementation that runs on GPUs (here on the CPU).
PATHS = [{"screen": "float32"}, {"screen": "bfloat16"}, {"screen": "int8"}, {"device": "cpu"}]
PATH_IDS = ["kernel-float32", "kernel-bfloat16", "kernel-int8", "torch"]
SCREENS = ["float32", "bfloat16", "int8"]


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


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_reference(seed, path):
    x, labels = make_clustered_data(seed, num_classes=80)
    actual = calc_retrieval_metrics(x, labels, recall_at_k=KS, compute_nmi=False, **path)
    assert_metrics_equal(actual, reference_metrics(x, labels, KS))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("block_size", [1, 5, 64, None])
def test_block_size_does_not_change_the_counts(block_size, path):
    x, labels = make_clustered_data(7, num_classes=50)
    expected_first, expected_ranks = reference_first_hit_and_ranks(x, labels)
    ranks = rank_positives(x, labels, max_k=len(x), block_size=block_size, **path)
    assert_ranks_match(ranks, expected_first, expected_ranks, every_rank="device" in path)


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


@pytest.mark.parametrize("screen", SCREENS)
def test_pruning_keeps_every_deciding_count_exact(screen):
    # Untrained-like embeddings (random): first hits far down the list, so pruning removes most of the work.
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 150, size=600)
    x = normalize(rng.normal(size=(600, 8)))
    exact = rank_positives(x, labels, max_k=len(x), device="cpu")
    for max_k in (1, 4, 50):
        pruned = rank_positives(x, labels, max_k=max_k, block_size=37, screen=screen)
        assert_deciding_ranks_equal(pruned, exact, max_k)


def assert_deciding_ranks_equal(actual, expected, max_k: int) -> None:
    """First hits equal up to ``max_k`` (beyond it no Recall@K can tell), and the ranks of positives within R."""
    np.testing.assert_array_equal(np.minimum(actual.first_hit_rank, max_k), np.minimum(expected.first_hit_rank, max_k))
    inside, ranks = actual.positives_within_r()
    inside_expected, ranks_expected = expected.positives_within_r()
    np.testing.assert_array_equal(inside, inside_expected)
    np.testing.assert_array_equal(ranks[inside], ranks_expected[inside_expected])


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_exact_ties_between_positives_and_negatives_follow_the_index(path):
    # Items 3 and 4 are exact copies of query 0's classmates 1 and 2 filed under other classes, and item 5 is a
    # copy of query 0 itself. Equal scores are ordered by index, so here each positive comes before its copy.
    e = np.eye(4, dtype=np.float32)
    a = normalize([e[0] + e[1]])[0]
    b = normalize([e[0] + 0.5 * e[2]])[0]
    x = np.stack([e[0], a, b, a, b, e[0], e[3], e[3]])
    labels = np.array([0, 0, 0, 1, 2, 3, 4, 4])
    expected_first, expected_ranks = reference_first_hit_and_ranks(x, labels)
    ranks = rank_positives(x, labels, max_k=len(x), **path)
    assert_ranks_match(ranks, expected_first, expected_ranks, every_rank="device" in path)
    # Moving the duplicates in front of their classmates in index order turns the ties the other way.
    permutation = [3, 4, 5, 0, 1, 2, 6, 7]
    xp, lp = x[permutation], labels[permutation]
    expected_first, expected_ranks = reference_first_hit_and_ranks(xp, lp)
    ranks = rank_positives(xp, lp, max_k=len(x), **path)
    assert_ranks_match(ranks, expected_first, expected_ranks, every_rank="device" in path)


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("dim", [6, 96])  # 96: the vectorised body of the exact score, not only its remainder
def test_kernel_and_torch_paths_agree_on_many_duplicates(screen, dim):
    rng = np.random.default_rng(0)
    base = normalize(rng.normal(size=(40, dim)))
    x = np.concatenate([base, base, base[:20]])
    labels = rng.integers(0, 25, size=len(x))
    ks = (1, 3, 10)
    kernel = calc_retrieval_metrics(x, labels, recall_at_k=ks, compute_nmi=False, chunk_size=16, screen=screen)
    torch_path = calc_retrieval_metrics(x, labels, recall_at_k=ks, compute_nmi=False, device="cpu")
    assert kernel == torch_path
    assert_metrics_equal(kernel, reference_metrics(x, labels, ks))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_many_duplicates_at_512_dimensions_equal_the_reference(path):
    # 550 items of which 250 are exact copies filed under random classes. At this width a float32 product rounds
    # the scores of copies differently at different places of the matrix, so copies tie with their positives only
    # if every deciding score comes from one computation (the torch path once got R@1 1.1 points off here).
    rng = np.random.default_rng(2)
    base = normalize(rng.normal(size=(300, 512)) + 3 * rng.normal(size=(1, 512)))
    x = np.concatenate([base, base[rng.permutation(300)[:150]], base[:100]])
    x = x[rng.permutation(len(x))]
    labels = rng.integers(0, 40, size=len(x))
    ks = (1, 2, 4)
    metrics = calc_retrieval_metrics(x, labels, recall_at_k=ks, compute_nmi=False, **path)
    assert_metrics_equal(metrics, reference_metrics(x, labels, ks))


@pytest.mark.parametrize("screen", ["bfloat16", "int8"])
def test_coarse_screens_rank_scores_finer_than_they_can_tell_apart(screen):
    # Query 0 sees all the others at cosines spread over [0.5, 0.51], 2e-5 apart: bfloat16 (steps of 2^-8 near
    # 0.5) and int8 codes cannot order them, so every deciding pair must be rescored exactly.
    rng = np.random.default_rng(5)
    num_items, dim = 500, 64
    cosines = rng.permutation(np.linspace(0.5, 0.51, num_items - 1))
    directions = rng.normal(size=(num_items - 1, dim - 1))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    others = np.concatenate([cosines[:, None], np.sqrt(1 - cosines[:, None] ** 2) * directions], axis=1)
    x = normalize(np.concatenate([np.eye(1, dim), others]))
    labels = np.concatenate([[0], rng.integers(0, 60, size=num_items - 1)])
    expected_first, expected_ranks = reference_first_hit_and_ranks(x, labels)
    for max_k in (len(x), 5):
        screened = rank_positives(x, labels, max_k=max_k, screen=screen, block_size=128)
        plain = rank_positives(x, labels, max_k=max_k, screen="float32", block_size=128)
        if max_k == len(x):
            assert_ranks_match(screened, expected_first, expected_ranks, every_rank=False)
        assert_deciding_ranks_equal(screened, plain, max_k)


@pytest.mark.parametrize("norm", [1.0, 3.0])
def test_screen_margin_bounds_the_bfloat16_product_error(norm):
    # Random directions, and coordinates that all round the same way (the worst case of the bound's derivation).
    rng = np.random.default_rng(0)
    dim = 512
    random_rows = normalize(rng.normal(size=(300, dim)))
    worst = np.full((2, dim), 1 + 2.0**-9, dtype=np.float32)  # rounds down to 1.0 in bfloat16: relative 2^-9
    worst[1, ::2] = 1 + 3 * 2.0**-9  # rounds up to 1 + 2^-7
    x = norm * np.concatenate([random_rows, normalize(worst)]).astype(np.float32)
    margin = screen_margin("bfloat16", x)
    xb = torch.from_numpy(x).to(torch.bfloat16)
    approx = (xb @ xb.T).float().numpy().astype(np.float64)
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    error = np.abs(approx - exact)
    assert error.max() <= margin
    assert error.max() > margin / 20  # the bound is not vacuous: a worst-case pair comes near it
    assert screen_margin("float32", x) < 1e-4 * norm**2


def test_screen_keys_admit_every_bfloat16_score_that_may_reach_the_limit():
    # Every finite bfloat16 value, against limits of both signs, zero and infinity (a finished query).
    bits = np.arange(-(2**15), 2**15, dtype=np.int32).astype(np.int16)
    values = torch.from_numpy(bits).view(torch.bfloat16).float().numpy()
    finite = np.isfinite(values)
    bits, values = bits[finite], values[finite]
    keys = bits.astype(np.int32) ^ ((bits.astype(np.int32) >> 15) & 0x7FFF)
    limits = np.array([0.5, 0.123456, 1e-3, 0.0, -0.0, -1e-3, -0.3, -0.987, 2.5, np.inf], dtype=np.float32)
    margin = 0.01
    limit_keys = screen_keys(limits, margin, "bfloat16")
    for limit, limit_key in zip(limits, limit_keys, strict=True):
        admitted = keys >= limit_key
        low = np.float64(limit) - margin
        assert admitted[values >= low].all(), limit
        if np.isfinite(limit):  # and no more than two bfloat16 steps (2^-7 relative) below the lowered limit
            assert not admitted[values < low - 2 * 2.0**-7 * abs(low)].any(), limit
        else:
            assert not admitted.any()  # a finished query
    # The float32 screen compares scores as they are.
    float_keys = screen_keys(limits, 0.0, "float32")
    finite = np.isfinite(limits)
    assert (float_keys[finite] < limits[finite]).all() and (float_keys[finite] > limits[finite] - 1e-6).all()
    assert np.isposinf(float_keys[~finite]).all()


def test_unknown_screen_is_refused():
    x, labels = make_clustered_data(0, num_classes=5)
    with pytest.raises(ValueError, match="screen must be one of"):
        rank_positives(x, labels, max_k=4, screen="int4")


def test_the_cpu_kernel_is_used():
    # The speed of the evaluation rests on it; the torch fallback is correct but many times slower on a CPU.
    assert numba_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_the_cpu():
    x, labels = make_clustered_data(4, num_classes=200, dim=64)
    cpu = calc_retrieval_metrics(x, labels, recall_at_k=KS, compute_nmi=False)
    assert calc_retrieval_metrics(x, labels, recall_at_k=KS, compute_nmi=False, device="cuda") == cpu


@pytest.mark.parametrize("norm", [1.0, 3.0])
def test_screen_margin_bounds_the_int8_product_error(norm):
    # Random directions, a spike (one large coordinate sets the scale for all) and codes that all round by half a step.
    rng = np.random.default_rng(1)
    dim = 512
    rows = normalize(rng.normal(size=(300, dim)))
    spike = np.zeros((1, dim), dtype=np.float32)
    spike[0, 0] = 1.0
    x = np.concatenate([rows, spike]).astype(np.float32)
    scale = screens.int8_scale(x)
    half = np.full((2, dim), 0.5 * scale, dtype=np.float32) + np.float32(1e-9)  # every code rounds from 0.5 steps
    x = norm * np.concatenate([x, half]).astype(np.float32)
    margin = screen_margin("int8", x)
    scale = screens.int8_scale(x)
    codes = screens.int8_codes(x, scale).numpy().astype(np.int64)
    approx = (codes @ codes.T).astype(np.float64) * scale * scale
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    error = np.abs(approx - exact)
    assert error.max() <= margin
    assert error.max() > margin / 100  # not vacuous


def test_int8_screen_keys_admit_every_product_that_may_reach_the_limit():
    scale, margin = 0.002, 0.03
    limits = np.array([0.5, 0.1234, 0.0, -0.25, np.inf], dtype=np.float32)
    keys = screen_keys(limits, margin, "int8", scale)
    products = np.arange(-200_000, 200_000, dtype=np.int64)  # integer products of the codes
    for limit, key in zip(limits, keys, strict=True):
        admitted = products >= key
        if np.isfinite(limit):
            reaches = products * scale * scale >= np.float64(limit) - margin
            assert admitted[reaches].all() and admitted.sum() <= reaches.sum() + 2, limit
        else:
            assert not admitted.any()


def _probe(seconds: float, accurate: bool = True) -> screens.ScreenProbe:
    return screens.ScreenProbe(seconds=seconds, error=0.001 if accurate else 0.05, margin=0.01)


@pytest.mark.parametrize(
    "timings, accurate, expected",
    [
        ({"float32": 10.0, "bfloat16": 2.0, "int8": 12.0}, True, "bfloat16"),  # AVX512-BF16 without VNNI
        ({"float32": 10.0, "bfloat16": 40.0, "int8": 3.0}, True, "int8"),  # VNNI only
        ({"float32": 10.0, "bfloat16": 4.0, "int8": 2.0}, True, "bfloat16"),  # both fast: bfloat16's margin is tighter
        ({"float32": 10.0, "bfloat16": 4.0, "int8": 2.0}, False, "float32"),  # fast but outside the margin: never
        ({"float32": 10.0, "bfloat16": 28.0, "int8": 49.0}, True, "float32"),  # AVX2 only: both emulated
        ({"float32": 10.0, "bfloat16": 7.0, "int8": 6.9}, True, "float32"),  # faster, but not by 1.5x
        ({"float32": 10.0, "bfloat16": 6.6}, True, "bfloat16"),  # no int8 product in this build of torch
        ({"float32": 10.0}, True, "float32"),
    ],
)
def test_the_screen_is_a_fast_product_that_stays_within_the_margin(timings, accurate, expected):
    probes = {name: _probe(seconds, accurate or name == "float32") for name, seconds in timings.items()}
    assert screens.pick_screen(probes) == expected


def test_the_screen_measurement_never_lets_an_inexact_product_decide_on_any_cpu():
    # What the measurement promises on every CPU, fast or emulated, exact or not: float32 is always there and within
    # its margin; every screen it reports was timed and its error measured (not assumed) against float64; and a
    # product outside its margin (int8 saturating under AVX2, say) is never chosen, nor run when forced.
    probes = screens.measure_screens(64)
    assert probes["float32"].accurate
    assert set(probes) <= {"float32", "bfloat16", "int8"}
    for name, probe in probes.items():
        assert 0 < probe.seconds < float("inf"), name
        assert probe.error > 0 and probe.margin > 0, name  # rounding makes some error; a zero would be unmeasured
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert screens.resolve_screen(name, 64, probes) == (name if probe.accurate else "float32")
    assert probes[screens.pick_screen(probes)].accurate
    assert screens.choose_screen(64) in probes


def test_an_int8_product_that_saturates_is_found_and_never_used(monkeypatch):
    # A stand-in for torch's AVX2 int8 product: 16-bit lanes that saturate on large codes.
    real_product = screens.screen_product

    def saturating(precision, left, right, out):
        real_product(precision, left, right, out)
        if precision == "int8":
            out.clamp_(-(2**15), 2**15 - 1)

    monkeypatch.setattr(screens, "screen_product", saturating)
    assert not screens.int8_product_is_exact(64)
    probes = screens.measure_screens(64)
    assert not probes["int8"].accurate and screens.pick_screen(probes) != "int8"


def test_a_forced_screen_that_is_inexact_here_falls_back_to_float32_with_a_warning(monkeypatch):
    x, labels = make_clustered_data(5, num_classes=40, dim=24)
    expected = reference_metrics(x, labels, KS)
    probe = screens.ScreenProbe(seconds=0.001, error=float("inf"), margin=0.04)
    given = {"float32": screens.ScreenProbe(0.01, 1e-7, 1e-5), "int8": probe, "bfloat16": probe}
    monkeypatch.setattr(screens, "measured_screens", lambda dim: given)
    for screen in ("int8", "bfloat16"):
        with pytest.warns(RuntimeWarning, match=f"the {screen} screen is not computed within its error bound"):
            actual = calc_retrieval_metrics(x, labels, recall_at_k=KS, compute_nmi=False, screen=screen)
        assert_metrics_equal(actual, expected)
