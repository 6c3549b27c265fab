"""Retrieval metrics of the deep-metric-learning protocol, computed exactly.

By default every item of the evaluation set is a query and the gallery is the whole set minus that query (query
set = gallery: CUB-200, Cars196, SOP). With a separate gallery (DeepFashion In-Shop's 14,218 queries and 12,612
gallery images, or a user's query/ and gallery/ folders) each query is searched in the gallery only, and R counts
the gallery items of its class; see :func:`calc_retrieval_metrics`. The metrics follow Musgrave et al., "A Metric
Learning Reality Check" (ECCV 2020):

- Recall@K: fraction of queries with at least one item of their class among the K nearest neighbours
  (the metric-learning sense, not IR recall); Precision@1 equals Recall@1.
- R-Precision: with R the number of *other* items of the query's class (of gallery items of its class, with a
  separate gallery), the fraction of correct items among the R nearest neighbours.
- MAP@R: (1/R) * sum_{i<=R} P@i * [i-th neighbour is correct].
- NMI: normalized mutual information between the labels and a k-means clustering with one cluster per class.

Queries whose class has no other item (singleton classes), or no gallery item with a separate gallery, cannot
retrieve anything correct; they are left out of the neighbour-based metrics, as pytorch-metric-learning's
``AccuracyCalculator`` does, and the number of queries kept is reported through ``num_queries``.

:func:`calc_retrieval_metrics` computes them all without neighbour lists: every metric follows from the rank of
each query's positives (see :mod:`metricsearch.metrics.positive_ranks`), which a blocked pass over the upper
triangle of the symmetric similarity matrix finds in O(N * R_max) memory. At SOP size (60,502 x 512) that is
several times faster than a k-NN search for K = 1000 and needs a fraction of its memory, with Recall@1000
included. The tests check it against plain neighbour-list references (``tests/metric_references.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from metricsearch.metrics.kmeans import KMeansSchedule, faiss_kmeans, nmi_schedule, torch_kmeans
from metricsearch.metrics.positive_ranks import PositiveRanks, rank_positives

__all__ = [
    "calc_metrics_from_positive_ranks",
    "calc_nmi",
    "calc_retrieval_metrics",
    "count_relevant",
]


def count_relevant(labels: np.ndarray, gallery_labels: np.ndarray | None = None) -> np.ndarray:
    """Counts, for every query, the items it should retrieve: R of R-Precision and MAP@R.

    Args:
        labels: Array of shape (N,) with the class of every item of the query = gallery set, or of every query.
        gallery_labels: Array of shape (G,) with the class of every item of a separate gallery, or None when the
            queries are the gallery.

    Returns:
        Int64 array of shape (N,): the number of other items of each query's class, or of gallery items of its
        class; zero marks a query that cannot be answered.

    Example:
        >>> count_relevant(np.array([3, 5, 3, 3, 7])).tolist()
        [2, 0, 2, 2, 0]
        >>> count_relevant(np.array([3, 5, 3]), gallery_labels=np.array([3, 7, 3, 3])).tolist()
        [3, 0, 3]
    """
    labels = np.asarray(labels)
    if gallery_labels is None:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        return counts[inverse.reshape(-1)].astype(np.int64) - 1
    _, inverse = np.unique(np.concatenate([labels, np.asarray(gallery_labels)]), return_inverse=True)
    inverse = inverse.reshape(-1)
    gallery_counts = np.bincount(inverse[len(labels) :], minlength=int(inverse.max(initial=-1)) + 1)
    return gallery_counts[inverse[: len(labels)]].astype(np.int64)


def calc_nmi(
    embeddings: np.ndarray,
    labels: np.ndarray,
    seed: int = 0,
    *,
    niter: int = 20,
    nredo: int = 5,
    device: str | torch.device | None = None,
) -> float:
    """Computes the NMI between the labels and a k-means clustering with one cluster per class.

    All items take part, singleton classes included: clustering has no queries to leave out (this matches
    pytorch-metric-learning's ``AccuracyCalculator``).

    Args:
        embeddings: Array of shape (N, D).
        labels: Array of shape (N,).
        seed: Seed of the k-means initialisation.
        niter: Number of k-means iterations per run.
        nredo: Number of k-means runs from different random initialisations; the run with the lowest k-means
            objective is kept. k-means initialises from randomly drawn points, and a single run often merges two
            well-separated classes (pytorch-metric-learning uses one run of 20 iterations, so its NMI can be
            a little lower).
        device: None for faiss on the CPU; a torch device (``"cuda"``) to run the iterations there with
            :func:`~metricsearch.metrics.kmeans.torch_kmeans` (faiss-cpu has no GPU k-means).

    Returns:
        Normalized mutual information (arithmetic normalisation, scikit-learn's default).

    Example:
        >>> x = np.array([[0.0, 1.0], [0.0, 0.9], [1.0, 0.0], [0.9, 0.0]], dtype=np.float32)
        >>> calc_nmi(x, np.array([5, 5, 8, 8]))
        1.0
    """
    x = _as_embedding_matrix(embeddings, min_rows=1)
    labels = _as_label_vector(labels, len(x))
    num_classes = len(np.unique(labels))
    if num_classes == 1:
        # Both partitions are a single block: scikit-learn calls that a perfect match.
        return 1.0
    schedule = KMeansSchedule(niter=niter, nredo=nredo)
    if device is None:
        assignment = faiss_kmeans(x, num_classes, schedule, seed=seed)
    else:
        assignment = torch_kmeans(torch.from_numpy(x).to(device), num_classes, schedule, seed=seed).cpu().numpy()
    return float(normalized_mutual_info_score(labels, assignment))


def calc_retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    recall_at_k: Sequence[int] = (1, 2, 4, 8),
    *,
    compute_nmi: bool = True,
    chunk_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    screen: str = "auto",
    nmi_max_macs: float | None = None,
    gallery_embeddings: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Computes all the retrieval metrics of a query = gallery set, or of queries in a gallery, in one pass.

    The results are those of a neighbour search with k = max(max(recall_at_k), max R) clipped to N - 1 and
    equal scores ordered by increasing index, but no neighbour list is built: the rank of each
    query's positives is counted directly (:func:`~metricsearch.metrics.positive_ranks.rank_positives`), so any
    K costs the same. Queries of singleton classes are left out of every neighbour-based metric;
    ``num_queries`` says how many were kept, ``num_queries_left_out`` how many were not.

    With ``gallery_embeddings`` and ``gallery_labels`` each query is searched in the gallery only: there is no
    self-exclusion (the query is not in the gallery; an exact copy of it there is a real neighbour), R is the
    number of gallery items of the query's class, equal scores are ordered by increasing gallery index, and
    queries whose class has no gallery item are left out (as pytorch-metric-learning's ``AccuracyCalculator``
    does with ``ref_includes_query=False``). NMI then clusters the query embeddings against the query labels,
    as ``AccuracyCalculator`` does.

    Args:
        embeddings: Array of shape (N, D), L2-normalised so that the inner product is the cosine similarity: the
            query = gallery set, or the queries when a gallery is given.
        labels: Array of shape (N,), the class of every item.
        recall_at_k: The values of K for Recall@K.
        compute_nmi: Whether to run k-means for NMI (the slowest part on large sets).
        nmi_max_macs: Budget of NMI's k-means in multiply-adds (None: unlimited); see
            :func:`~metricsearch.metrics.kmeans.nmi_schedule`. Over it, fewer runs and then fewer iterations are
            spent, and NMI is left out (with a warning) when even one short run does not fit.
        chunk_size: Rows of each block of the similarity matrix computed at once (default: 4096 on the CPU, 8192
            on a GPU); memory grows with it, results do not change.
        seed: Seed of the k-means clustering.
        device: None to compute on the CPU; a torch device such as ``"cuda"`` to compute the similarity blocks
            there (the embeddings are copied to it).
        screen: On the CPU, the arithmetic of the product that screens the pairs (every pair near a decision is
            rescored exactly in float32): ``"int8"``, ``"bfloat16"``, ``"float32"``, or ``"auto"``: the fastest on
            this CPU among those at least 1.5x faster than float32 (VNNI, AVX512-BF16, AMX). It changes the speed,
            not the metrics.
        gallery_embeddings: Array of shape (G, D), prepared like ``embeddings``: the gallery the queries are
            searched in, or None when the queries are the gallery.
        gallery_labels: Array of shape (G,), the class of every gallery item (given with ``gallery_embeddings``).

    Returns:
        A dict with keys ``recall@{K}`` for each K, ``precision@1``, ``r_precision``, ``map@r``, ``nmi`` (when
        computed: asked for and within its budget), ``num_queries`` (the queries the metrics average over) and
        ``num_queries_left_out`` (those without a same-class gallery item). When no query can be answered the
        metrics are 0.0, with a warning.

    Raises:
        ValueError: On embeddings that are not a finite 2D array with at least two rows (one query and one
            gallery item with a gallery), labels that are not a 1D array of the same length, a gallery of another
            dimension than the queries or given without its labels, or values of K smaller than 1.

    Example:
        >>> x = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
        >>> metrics = calc_retrieval_metrics(x, np.array([0, 0, 1, 1]), recall_at_k=(1, 2), compute_nmi=False)
        >>> metrics["recall@1"], metrics["recall@2"], metrics["map@r"], metrics["num_queries"]
        (0.5, 1.0, 0.5, 4.0)

        The first two items as queries, searched in the last two (query 0's class has no gallery item):

        >>> metrics = calc_retrieval_metrics(
        ...     x[:2], np.array([0, 1]), recall_at_k=(1, 2), compute_nmi=False,
        ...     gallery_embeddings=x[2:], gallery_labels=np.array([1, 2]),
        ... )
        >>> metrics["recall@1"], metrics["map@r"], metrics["num_queries"]
        (1.0, 1.0, 1.0)
    """
    gallery = _as_gallery(gallery_embeddings, gallery_labels)
    x = _as_embedding_matrix(embeddings, min_rows=2 if gallery is None else 1)
    labels = _as_label_vector(labels, len(x))
    if gallery is not None and gallery[0].shape[1] != x.shape[1]:
        raise ValueError(
            f"gallery_embeddings have {gallery[0].shape[1]} dimensions but the query embeddings {x.shape[1]}: "
            "embed both with the same model"
        )
    ks = _check_ks(recall_at_k)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")

    num_relevant = count_relevant(labels, None if gallery is None else gallery[1])
    answerable = num_relevant > 0
    num_queries = int(np.count_nonzero(answerable))

    metrics: dict[str, float] = {}
    if num_queries == 0:
        warnings.warn(
            f"No query has {'another item' if gallery is None else 'a gallery item'} of its class: "
            "the retrieval metrics are set to 0.",
            RuntimeWarning,
            stacklevel=2,
        )
        metrics.update({f"recall@{k}": 0.0 for k in ks})
        metrics.update({"precision@1": 0.0, "r_precision": 0.0, "map@r": 0.0})
    else:
        # NOTE: singletons stay in the gallery (they can outrank the positives of others); only their own rows,
        # which have no positives, are left out. The same holds for gallery items of classes without queries.
        gallery_embeddings, gallery_labels = (None, None) if gallery is None else gallery
        ranks = rank_positives(x, labels, max_k=max(ks), gallery_embeddings=gallery_embeddings,
                               gallery_labels=gallery_labels, block_size=chunk_size, device=device,
                               screen=screen)  # fmt: skip
        metrics.update(calc_metrics_from_positive_ranks(ranks, ks, answerable))
    if compute_nmi:
        # With a gallery, the queries are clustered against their labels (as AccuracyCalculator does).
        num_classes = len(np.unique(labels))
        on_gpu = device is not None and torch.device(device).type != "cpu"
        budget = None if on_gpu else nmi_max_macs
        schedule = nmi_schedule(len(x), num_classes, x.shape[1], KMeansSchedule(20, 5), budget)
        if schedule is None:
            warnings.warn(
                f"NMI left out: k-means with {num_classes:,} clusters over {len(x):,} x {x.shape[1]} embeddings "
                f"costs more than the budget of {nmi_max_macs:.1e} multiply-adds even for one short run "
                "(raise module.nmi_max_macs, or evaluate on a GPU, where the budget does not apply)",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            metrics["nmi"] = calc_nmi(x, labels, seed=seed, niter=schedule.niter, nredo=schedule.nredo, device=device)
    metrics["num_queries"] = float(num_queries)
    metrics["num_queries_left_out"] = float(len(x) - num_queries)
    return metrics


def calc_metrics_from_positive_ranks(
    ranks: PositiveRanks, ks: Sequence[int], queries: np.ndarray | None = None
) -> dict[str, float]:
    """Computes Recall@K, Precision@1, R-Precision and MAP@R from the ranks of each query's positives.

    The m-th positive of a query sits at rank ``m + (negatives before it)``, and the precision there is
    ``m / rank``; so MAP@R is the mean of ``(1/R) * sum of m / rank_m`` over the positives within the top R,
    R-Precision the mean fraction of positives within the top R, and a query counts for Recall@K when its
    first positive's rank is below K.

    Args:
        ranks: The per-query counts of :func:`~metricsearch.metrics.positive_ranks.rank_positives`.
        ks: The values of K.
        queries: Boolean mask of the queries to average over (default: those with R > 0).

    Returns:
        A dict with ``recall@{K}``, ``precision@1``, ``r_precision`` and ``map@r``.
    """
    ks = _check_ks(ks)
    if queries is None:
        queries = ranks.num_relevant > 0
    num_queries = int(np.count_nonzero(queries))
    first_hit = ranks.first_hit_rank[queries]
    inside, positive_ranks = ranks.positives_within_r()
    inside, positive_ranks = inside[queries], positive_ranks[queries]
    num_relevant = ranks.num_relevant[queries]
    metrics = {f"recall@{k}": float(np.count_nonzero(first_hit < k)) / num_queries for k in ks}
    metrics["precision@1"] = float(np.count_nonzero(first_hit < 1)) / num_queries
    metrics["r_precision"] = float(np.mean(np.count_nonzero(inside, axis=1) / num_relevant))
    position = np.arange(1, inside.shape[1] + 1, dtype=np.float64)
    precision_at_hits = np.where(inside, position[None, :] / np.maximum(positive_ranks, 1), 0.0)
    metrics["map@r"] = float(np.mean(precision_at_hits.sum(axis=1) / num_relevant))
    return metrics


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"recall_at_k needs at least one K and every K >= 1, got {ks}")
    return ks


def _as_embedding_matrix(embeddings: np.ndarray, min_rows: int = 2, name: str = "embeddings") -> np.ndarray:
    """Validates the embeddings and returns them as a C-contiguous float32 array, the layout faiss and BLAS need.

    Nothing here writes into the array, so float32 C-contiguous input is used as it is: at SOP size a copy would
    add 120 MB to the peak memory. A query = gallery set needs two rows; queries or a gallery of their own, one.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2D array (N, D), got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} {name} to retrieve anything, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one dimension")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


def _as_label_vector(labels: np.ndarray, num_items: int, name: str = "embeddings") -> np.ndarray:
    labels = np.asarray(labels)
    kind = "labels" if name == "embeddings" else name.replace("embeddings", "labels")
    if labels.ndim != 1:
        raise ValueError(f"{kind} must be a 1D array, got shape {labels.shape}")
    if len(labels) != num_items:
        raise ValueError(f"got {num_items} {name} but {len(labels)} {kind}")
    return labels


def _as_gallery(embeddings: np.ndarray | None, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The validated gallery (embeddings, labels), or None when there is none (the queries are the gallery)."""
    if embeddings is None and labels is None:
        return None
    if embeddings is None or labels is None:
        missing = "gallery_labels" if labels is None else "gallery_embeddings"
        raise ValueError(f"{missing} missing: give gallery_embeddings and gallery_labels together, or neither")
    x = _as_embedding_matrix(embeddings, min_rows=1, name="gallery_embeddings")
    return x, _as_label_vector(labels, len(x), name="gallery_embeddings")
