"""Verification metrics: FNMR at a given FMR, and the ROC / DET curve, over every pair of a test set.

Verification asks "are these two images of the same class?" by thresholding their similarity. Every pair of the
test set is scored (with a separate gallery: every query x gallery pair); pairs of one class are *genuine*, the
others *impostors*. At a threshold ``t`` a pair is accepted when its score is strictly above ``t``:

- FMR(t), the false match rate: the fraction of impostor pairs accepted;
- FNMR(t), the false non-match rate: the fraction of genuine pairs rejected (score <= t).

FNMR at FMR = f takes the lowest threshold whose FMR does not exceed f: with ``m = floor(f * impostors)``, that is
the (m + 1)-th highest impostor score, so that at most m impostors score above it (ties at the threshold are all
rejected, never split by position).

The number of pairs grows with N^2 (1.8e9 at SOP size), so no list of pairs is built. One blocked pass over the
similarity matrix counts the scores of each kind in 65,536 bins of their order-preserving float32 bit pattern,
which gives the curve exactly at every bin edge and tells which bin holds each wanted order statistic; a second
pass keeps only the scores that fall in those bins and selects the exact value among them. Both passes score the
pairs with the same blocked product, so a pair gets the same score in each.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["VerificationCurve", "calc_fnmr_at_fmr", "calc_verification", "score_pairs_in_blocks"]

_NUM_BINS = 1 << 16
_BLOCK_ELEMENTS = 1 << 23  # scores per block (32 MiB of float32)


@dataclass(frozen=True)
class VerificationCurve:
    """The ROC / DET curve at every bin edge, plus the exact operating points asked for.

    Attributes:
        thresholds: Ascending thresholds: the lowest float32 value of each non-empty bin, then +inf.
        fmr: False match rate at each threshold, a pair being accepted when its score is at least the threshold
            (the same as "above the next lower float32"), so each point is exact.
        fnmr: False non-match rate at each threshold.
        operating_points: For each asked FMR: ``{"fmr_target", "threshold", "fmr", "fnmr"}``, exact, with pairs
            accepted when their score is above ``threshold``.
        num_genuine: Number of genuine pairs.
        num_impostor: Number of impostor pairs.
    """

    thresholds: np.ndarray
    fmr: np.ndarray
    fnmr: np.ndarray
    operating_points: list[dict[str, float]]
    num_genuine: int
    num_impostor: int


def score_pairs_in_blocks(
    embeddings: np.ndarray, gallery_embeddings: np.ndarray | None = None, block_elements: int = _BLOCK_ELEMENTS
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Yields ``(rows, columns_start, scores)`` blocks covering every pair once.

    Without a gallery the pairs are those of the upper triangle (i < j) of the set against itself; with one,
    every query x gallery pair. Scores are float32 inner products with -0.0 made +0.0 (so that equal scores have
    equal bit patterns).

    Yields:
        ``(rows, cols, scores)``: the query rows of the block, the gallery columns it covers (an index array) and
        a (len(rows), len(cols)) float32 matrix, with entries of pairs outside the triangle set to NaN.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    gallery = x if gallery_embeddings is None else np.ascontiguousarray(gallery_embeddings, dtype=np.float32)
    num_columns = len(gallery)
    block_rows = max(1, block_elements // max(num_columns, 1))
    for start in range(0, len(x), block_rows):
        rows = slice(start, min(start + block_rows, len(x)))
        if gallery_embeddings is None:
            # Only columns right of the block's first row can hold an i < j pair.
            cols = np.arange(start + 1, num_columns)
            if len(cols) == 0:
                continue
            scores = x[rows] @ gallery[cols].T
            row_index = np.arange(rows.start, rows.stop)[:, None]
            scores[cols[None, :] <= row_index] = np.nan
        else:
            cols = np.arange(num_columns)
            scores = x[rows] @ gallery.T
        scores += np.float32(0.0)
        yield rows, cols, scores


def _sortable_keys(scores: np.ndarray) -> np.ndarray:
    """Maps float32 scores to uint32 keys with the same order (negative values flipped, positive ones offset)."""
    bits = scores.view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def _key_to_score(key: int) -> float:
    """Inverts :func:`_sortable_keys` for one key."""
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _split_block(
    rows: slice, cols: np.ndarray, scores: np.ndarray, labels: np.ndarray, gallery_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The genuine and the impostor scores of one block, as flat arrays (pairs outside the triangle dropped)."""
    same = labels[rows][:, None] == gallery_labels[cols][None, :]
    valid = ~np.isnan(scores)
    return scores[same & valid], scores[~same & valid]


def calc_verification(
    embeddings: np.ndarray,
    labels: np.ndarray,
    fmr_targets: Sequence[float] = (1e-1, 1e-2, 1e-3),
    *,
    gallery_embeddings: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    block_elements: int = _BLOCK_ELEMENTS,
) -> VerificationCurve:
    """Computes the exact FNMR at each FMR target and the ROC / DET curve, without materialising all pairs.

    Args:
        embeddings: (N, D) L2-normalised embeddings (the queries when a gallery is given).
        labels: (N,) class of every item.
        fmr_targets: False match rates in (0, 1] at which to report the FNMR.
        gallery_embeddings: (G, D) gallery, or None to score the pairs of the set among itself.
        gallery_labels: (G,) gallery classes, with ``gallery_embeddings``.
        block_elements: Scores computed at once; memory grows with it, results do not change.

    Returns:
        A :class:`VerificationCurve`.

    Raises:
        ValueError: On non-finite or ill-shaped inputs, FMR targets outside (0, 1], or a set without a genuine or
            without an impostor pair.

    Example:
        >>> x = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
        >>> curve = calc_verification(x, np.array([0, 0, 1, 1]), fmr_targets=(0.5,))
        >>> curve.num_genuine, curve.num_impostor, curve.operating_points[0]["fnmr"]
        (2, 4, 0.0)
    """
    x, labels, gallery, gallery_labels = _check_inputs(embeddings, labels, gallery_embeddings, gallery_labels)
    targets = [float(f) for f in fmr_targets]
    if any(not (0.0 < f <= 1.0) for f in targets):
        raise ValueError(f"FMR targets must lie in (0, 1], got {targets}")

    genuine_hist = np.zeros(_NUM_BINS, dtype=np.int64)
    impostor_hist = np.zeros(_NUM_BINS, dtype=np.int64)
    for rows, cols, scores in score_pairs_in_blocks(x, gallery, block_elements):
        genuine, impostor = _split_block(rows, cols, scores, labels, gallery_labels)
        genuine_hist += np.bincount(_sortable_keys(genuine) >> 16, minlength=_NUM_BINS)
        impostor_hist += np.bincount(_sortable_keys(impostor) >> 16, minlength=_NUM_BINS)
    num_genuine, num_impostor = int(genuine_hist.sum()), int(impostor_hist.sum())
    if num_genuine == 0 or num_impostor == 0:
        kind = "genuine (same-class)" if num_genuine == 0 else "impostor (different-class)"
        raise ValueError(f"the test set has no {kind} pair: verification needs both kinds")

    # The (m + 1)-th highest impostor score for each target, found in its bin by a second pass.
    impostors_above = np.cumsum(impostor_hist[::-1])[::-1]  # impostors in this bin or higher
    wanted: dict[float, tuple[int, int]] = {}
    for f in targets:
        rank = int(np.floor(f * num_impostor)) + 1  # 1-based rank from the top
        if rank > num_impostor:
            continue  # every impostor may be accepted: threshold -inf
        bin_index = int(np.nonzero(impostors_above >= rank)[0][-1])
        above_bin = int(impostors_above[bin_index + 1]) if bin_index + 1 < _NUM_BINS else 0
        wanted[f] = (bin_index, rank - above_bin)
    bins = sorted({b for b, _ in wanted.values()})
    in_bin_impostors: dict[int, list[np.ndarray]] = {b: [] for b in bins}
    in_bin_genuine: dict[int, list[np.ndarray]] = {b: [] for b in bins}
    if bins:
        bin_array = np.array(bins, dtype=np.uint32)
        for rows, cols, scores in score_pairs_in_blocks(x, gallery, block_elements):
            genuine, impostor = _split_block(rows, cols, scores, labels, gallery_labels)
            for values, store in ((impostor, in_bin_impostors), (genuine, in_bin_genuine)):
                value_bins = _sortable_keys(values) >> 16
                hit = np.isin(value_bins, bin_array)
                for b in np.unique(value_bins[hit]):
                    store[int(b)].append(values[value_bins == b])

    genuine_below = np.cumsum(genuine_hist) - genuine_hist  # genuine pairs in lower bins
    operating_points = []
    for f in targets:
        if f not in wanted:
            operating_points.append({"fmr_target": f, "threshold": float("-inf"), "fmr": 1.0, "fnmr": 0.0})
            continue
        bin_index, rank_in_bin = wanted[f]
        in_bin = np.sort(np.concatenate(in_bin_impostors[bin_index]))[::-1]
        threshold = in_bin[rank_in_bin - 1]
        accepted = int(impostors_above[bin_index + 1]) if bin_index + 1 < _NUM_BINS else 0
        accepted += int(np.count_nonzero(in_bin > threshold))
        genuine_in_bin = in_bin_genuine[bin_index]
        rejected = int(genuine_below[bin_index])
        if genuine_in_bin:
            rejected += int(np.count_nonzero(np.concatenate(genuine_in_bin) <= threshold))
        operating_points.append(
            {"fmr_target": f, "threshold": float(threshold), "fmr": accepted / num_impostor,
             "fnmr": rejected / num_genuine}
        )  # fmt: skip

    # The curve at the lowest representable score of each non-empty bin: accepted = in this bin or higher.
    occupied = np.nonzero(genuine_hist + impostor_hist)[0]
    genuine_above = np.cumsum(genuine_hist[::-1])[::-1]
    thresholds = np.array([_key_to_score(int(b) << 16) for b in occupied] + [np.inf])
    fmr = np.append(impostors_above[occupied] / num_impostor, 0.0)
    fnmr = np.append(1.0 - genuine_above[occupied] / num_genuine, 1.0)
    return VerificationCurve(thresholds, fmr, fnmr, operating_points, num_genuine, num_impostor)


def calc_fnmr_at_fmr(
    embeddings: np.ndarray,
    labels: np.ndarray,
    fmr_targets: Sequence[float] = (1e-1, 1e-2, 1e-3),
    **kwargs,
) -> dict[str, float]:
    """FNMR at each FMR target as a flat dict (``fnmr@fmr=0.01``), the form the metrics tables and W&B take."""
    curve = calc_verification(embeddings, labels, fmr_targets, **kwargs)
    return {f"fnmr@fmr={point['fmr_target']:g}": point["fnmr"] for point in curve.operating_points}


def _check_inputs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    gallery_embeddings: np.ndarray | None,
    gallery_labels: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    x = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) < 1 or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite 2D array with at least one row, got shape {x.shape}")
    if labels.shape != (len(x),):
        raise ValueError(f"labels must have shape ({len(x)},), got {labels.shape}")
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("give gallery_embeddings and gallery_labels together")
    if gallery_embeddings is None:
        return x, labels, None, labels
    gallery = np.asarray(gallery_embeddings, dtype=np.float32)
    gallery_labels = np.asarray(gallery_labels)
    if gallery.ndim != 2 or gallery.shape[1] != x.shape[1] or not np.isfinite(gallery).all():
        raise ValueError(
            f"gallery_embeddings must be a finite 2D array with {x.shape[1]} columns, got shape {gallery.shape}"
        )
    if gallery_labels.shape != (len(gallery),):
        raise ValueError(f"gallery_labels must have shape ({len(gallery)},), got {gallery_labels.shape}")
    return x, labels, gallery, gallery_labels
