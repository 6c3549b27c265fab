"""The statistics of a fair loss comparison ("A Metric Learning Reality Check", Musgrave, Belongie, Lim 2020).

Pure functions on numbers the runs already produced: the mean and Student-t confidence interval of a loss's
separate models, Welch's t-test between two losses, which losses are indistinguishable from the best, and the
metrics of several models' test embeddings concatenated (the Reality Check's "concatenated" evaluation), read
from the files runs write with ``save_test_embeddings=true`` (:mod:`metricsearch.analysis.run_folder`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from metricsearch.analysis.run_folder import load_embeddings
from metricsearch.metrics.retrieval import calc_retrieval_metrics

__all__ = [
    "concatenated_metrics",
    "indistinguishable_from_best",
    "mean_ci",
    "welch_test",
]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean of ``values`` and its two-sided Student-t confidence interval.

    ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation: the interval the
    Reality Check reports over its separately trained models.

    Args:
        values: one number per model (e.g. the test MAP@R of each of the K folds x S seeds models).
        confidence: coverage of the interval, in (0, 1).

    Returns:
        ``(mean, low, high)``; with a single value the interval is unknown: ``(value, nan, nan)``.

    Raises:
        ValueError: no values, or a confidence outside (0, 1).

    Example:
        >>> [round(v, 4) for v in mean_ci([1.0, 2.0, 3.0])]
        [2.0, -0.4841, 4.4841]
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"mean_ci needs a non-empty list of numbers, got {values!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must lie between 0 and 1 (e.g. 0.95)")
    mean = float(x.mean())
    if len(x) == 1:
        return mean, math.nan, math.nan
    half_width = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half_width, mean + half_width


def welch_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test that ``a`` and ``b`` have the same mean.

    Two constant samples have no variance to test with: their p-value is 1.0 when they are equal and 0.0 when
    they differ (where scipy would return NaN).

    Raises:
        ValueError: a sample with fewer than two values.

    Example:
        >>> welch_test([0.5, 0.5], [0.5, 0.5])
        1.0
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"Welch's t-test needs at least two values per sample, got {len(x)} and {len(y)}")
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return 1.0 if x[0] == y[0] else 0.0
    with warnings.catch_warnings():
        # A constant sample (every model gave the same number) is a legitimate input; its variance is zero up to
        # rounding, which scipy warns about.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def indistinguishable_from_best(samples: Mapping[str, Sequence[float]], alpha: float = 0.05) -> dict[str, bool]:
    """Marks the losses whose results cannot be told apart from the best loss's (higher is better).

    The loss with the best mean is marked True. Every other loss is marked True when Welch's t-test
    (:func:`welch_test`) between its values and the best loss's gives ``p >= alpha``. The values are the K folds x
    S seeds separately trained models of each loss, taken as independent samples; the tests are NOT corrected for
    multiple comparisons (one test per loss), so with many losses some are marked worse by chance.

    Args:
        samples: loss name -> one metric value per model.
        alpha: significance level.

    Returns:
        loss name -> whether it is indistinguishable from the best, in the order of ``samples``.
    """
    if not samples:
        return {}
    means = {name: float(np.mean(values)) for name, values in samples.items()}
    best = max(means, key=means.get)
    return {name: name == best or welch_test(values, samples[best]) >= alpha for name, values in samples.items()}


def concatenated_metrics(paths: Sequence[str | os.PathLike[str]], recall_at_k: Sequence[int]) -> dict[str, float]:
    """Retrieval metrics of several models tested on the same test set, their embeddings concatenated.

    Each model's embeddings are L2-normalised, concatenated along the features, and the result normalised again
    (which does not change the ranking: the cosine similarity of two concatenations is the mean of the models'
    cosine similarities). The metrics are the project's exact ones (:func:`calc_retrieval_metrics`, as in every
    run's evaluation), without NMI.

    Args:
        paths: the test embeddings file of each model (e.g. the K fold models of one seed).
        recall_at_k: the values of K for Recall@K.

    Returns:
        ``recall@K`` for each K, ``precision@1``, ``r_precision``, ``map@r`` and ``num_queries``.

    Raises:
        ValueError: no paths, or files whose indices or labels differ (models tested on different sets).
    """
    if not paths:
        raise ValueError("concatenated_metrics needs the test embeddings of at least one model")
    parts = []
    first = load_embeddings(paths[0])
    for path in paths:
        collected = load_embeddings(path)
        if not np.array_equal(collected.indices, first.indices) or not np.array_equal(collected.labels, first.labels):
            raise ValueError(
                f"{Path(path)} was tested on other images than {Path(paths[0])} (their indices or labels differ); "
                "concatenate only models tested on the same test set"
            )
        parts.append(_normalized(collected.embeddings))
    embeddings = _normalized(np.concatenate(parts, axis=1))
    return calc_retrieval_metrics(embeddings, first.labels, recall_at_k, compute_nmi=False)


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
