"""Where every same-class item ranks in each query's neighbour list, without ever holding the N x N similarity.

Recall@K, R-Precision and MAP@R of a query = gallery set depend only on the ranks of each query's positives (the
other items of its class) among all its neighbours. The rank of the m-th best positive is ``m`` plus the number of
negatives (items of other classes) scored above it, so it suffices to count, for every query, how many negatives
beat each of its positives:

- Recall@K only needs the count above the *best* positive (the rank of the first hit), for every K at once;
- R-Precision and MAP@R need the counts above each of the R positives, but only while they are below R.

The search runs in two phases:

1. every class's own Gram matrix gives each query's positive scores, sorted (cheap: a sum of class size squared);
2. the similarity matrix is computed block by block over its upper triangle only (it is symmetric because the
   queries are the gallery), and each block updates both its row queries and its column queries. For each
   negative score a binary search over the query's sorted positive scores finds the first positive it beats,
   and one histogram bin per query and positive is incremented.

Memory is O(N * R_max) for the state plus one block of scores, instead of the O(N * K) neighbour lists of a k-NN
search or the O(N^2) matrix (phase 1 also holds the Gram matrix of the largest class: a dataset with a class of
n images needs n^2 floats there, as a k-NN search would need k >= n - 1 neighbours per query).

On the CPU the block product only *screens* the pairs: a negative matters to a query only if it scores above the
lowest of the query's positives that can still change a metric, and almost none do. The product runs in int8
(exact int32 sums of codes on one scale) or bfloat16 where the CPU multiplies them fast (VNNI, AVX512-BF16, AMX;
chosen by :func:`~metricsearch.metrics.screen.choose_screen`), else in float32; every pair that may lie within the
product's worst-case error (:func:`~metricsearch.metrics.screen.screen_margin`) of a query's threshold is rescored by
:func:`~metricsearch.metrics.rank_kernels.exact_score`, a fixed float32 inner product
that phase 1 uses as well. Only the exact scores decide, so the result does not depend on the screen, and exact
copies of an item tie exactly (BLAS may round the same product differently at different places of a matrix).

Neighbours of exactly equal score are ordered by increasing index (as the neighbour-list references of the tests
order them), so duplicates of the query's classmates in other classes are ranked reproducibly.

Queries searched in a separate gallery (DeepFashion In-Shop, a user's query/ and gallery/ folders) take the same two
phases, rectangular: phase 1 scores each query against its class's gallery items (no self-exclusion: a query is not
in the gallery, and an exact copy of it there is a real neighbour), and phase 2 passes over query x gallery blocks,
updating their row queries only. R is then the number of gallery items of the query's class.

The screen's arithmetic lives in :mod:`metricsearch.metrics.screen` and the compiled kernels in
:mod:`metricsearch.metrics.rank_kernels`; this module holds the two phases and their drivers.

Two implementations of phase 2 give the same counts: the numba kernel for the CPU, which skips every negative
scored below the lowest positive that can still matter (a row is skipped entirely once its first hit is beyond
every K and no positive can enter its top R), and a vectorised torch version for GPUs, where brute force in
float32 is faster than branching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from metricsearch.metrics.rank_kernels import count_block, count_gallery_block, cross_group_gram, group_gram, numba
from metricsearch.metrics.screen import (
    SCREENS,
    int8_scale,
    resolve_screen,
    screen_keys,
    screen_margin,
    screen_operands,
    screen_product,
)

__all__ = ["PositiveRanks", "rank_positives"]

# Rows (and at least the columns) of a block of the similarity matrix: 4096^2 float32 scores take 64 MB on the CPU;
# on a GPU 8192^2 scores and their int64 keys take ~2 GB, and larger blocks keep it busy.
CPU_BLOCK_SIZE = 4096
CUDA_BLOCK_SIZE = 8192
# Upper bound of the batched per-class Gram matrices of phase 1 (number of float32 scores held at once).
GRAM_BUDGET = 1 << 24


@dataclass(frozen=True)
class PositiveRanks:
    """Per query: how many positives it has and how many negatives outrank each of them.

    Attributes:
        num_relevant: Shape (N,): R, the number of other items of the query's class (0 for singletons); with a
            separate gallery, the number of gallery items of the query's class (0 when it has none there).
        negatives_before: Shape (N, R_max), int64: entry ``[q, m]`` is the number of negatives ranked before the
            query's (m+1)-th best positive. Exact while it decides a metric: the first column is exact below
            ``max_k`` (beyond it the query misses every Recall@K anyway), and column m is exact while
            ``m + 1 + negatives_before[q, m] <= R``; beyond that the positive is outside the top R whatever the
            exact count. Columns ``m >= R`` are meaningless.
    """

    num_relevant: np.ndarray
    negatives_before: np.ndarray

    @property
    def first_hit_rank(self) -> np.ndarray:
        """0-based rank of each query's nearest positive among its neighbours (valid where R > 0)."""
        if self.negatives_before.shape[1] == 0:
            return np.zeros(len(self.num_relevant), dtype=np.int64)
        return self.negatives_before[:, 0]

    def positives_within_r(self) -> tuple[np.ndarray, np.ndarray]:
        """For every query and positive m (1-based), whether it ranks within the top R, and its rank.

        Returns:
            ``(inside, ranks)``, both of shape (N, R_max): ``inside[q, m-1]`` is true when the m-th positive is
            among the R nearest neighbours, and ``ranks[q, m-1]`` its 1-based rank (meaningful where inside).
        """
        position = np.arange(1, self.negatives_before.shape[1] + 1, dtype=np.int64)
        ranks = position[None, :] + self.negatives_before
        inside = (position[None, :] <= self.num_relevant[:, None]) & (ranks <= self.num_relevant[:, None])
        return inside, ranks


def rank_positives(
    embeddings: np.ndarray,
    labels: np.ndarray,
    max_k: int,
    *,
    gallery_embeddings: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    block_size: int | None = None,
    device: str | torch.device | None = None,
    screen: str = "auto",
) -> PositiveRanks:
    """Counts, for every query, the negatives ranked before each of its positives.

    Without a gallery the queries are the gallery (query = gallery set: each item is searched among the others);
    with one, each query is searched in the gallery only.

    Args:
        embeddings: Shape (N, D), float32, C-contiguous and finite (as ``_as_embedding_matrix`` returns them);
            L2-normalised so that the inner product is the cosine similarity.
        labels: Shape (N,), the class of every item.
        max_k: The largest K of Recall@K; counts above the first positive are exact below it.
        gallery_embeddings: Shape (G, D), prepared like ``embeddings``, or None for a query = gallery set.
        gallery_labels: Shape (G,), the class of every gallery item (given with ``gallery_embeddings``).
        block_size: Rows of each block of the similarity matrix (default: 4096 on the CPU, 8192 on a GPU). On the
            CPU, blocks span at least 4096 columns, so that thin blocks do not cost a kernel call per few scores.
        device: None for the CPU (numba kernel); a torch device (e.g. ``"cuda"``) to run phase 2 with torch
            there, which also works on ``"cpu"`` (it is what the tests check the GPU code with).
        screen: Precision of the CPU kernel's screening product (one of :data:`SCREENS`). Only which pairs get an
            exact score depends on it, never the result.

    Returns:
        The per-query counts; see :class:`PositiveRanks`.
    """
    if screen not in SCREENS:
        raise ValueError(f"screen must be one of {SCREENS}, got {screen!r}")
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("give gallery_embeddings and gallery_labels together, or neither")
    use_numba = device is None and numba is not None
    if device is None and not use_numba:
        device = "cpu"
    if gallery_embeddings is not None:
        return _rank_in_gallery(
            embeddings, labels, gallery_embeddings, gallery_labels, max_k, block_size, device, screen, use_numba
        )
    classes = np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
    # NOTE: the scores that decide must all come from one computation, so that exact copies of an item tie
    # exactly: BLAS gives copies different roundings in different places of a product (edge tiles), so the kernel
    # rescores with exact_score, which phase 1 uses too.
    gram = group_gram if use_numba else _matmul_group_gram
    num_relevant, pos_scores, pos_index = _sorted_positive_scores(embeddings, classes, gram)
    num_items, max_r = pos_scores.shape
    if max_r == 0:
        return PositiveRanks(num_relevant, np.zeros((num_items, 0), dtype=np.int64))
    if use_numba:
        size = block_size or CPU_BLOCK_SIZE
        precision = resolve_screen(screen, embeddings.shape[1])
        counts = _count_with_numba(embeddings, classes, num_relevant, pos_scores, pos_index, max_k, size, precision)
    else:
        device = torch.device(device)
        size = block_size or (CUDA_BLOCK_SIZE if device.type == "cuda" else CPU_BLOCK_SIZE)
        counts = _count_with_torch(embeddings, classes, num_relevant, pos_scores, pos_index, size, device)
    return PositiveRanks(num_relevant, np.cumsum(counts, axis=1))


def _rank_in_gallery(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    max_k: int,
    block_size: int | None,
    device: str | torch.device | None,
    screen: str,
    use_numba: bool,
) -> PositiveRanks:
    """:func:`rank_positives` for queries searched in a separate gallery (see its arguments)."""
    both = np.unique(np.concatenate([np.asarray(query_labels), np.asarray(gallery_labels)]), return_inverse=True)[1]
    both = both.reshape(-1).astype(np.int64)
    query_classes, gallery_classes = both[: len(queries)], both[len(queries) :]
    gram = cross_group_gram if use_numba else _matmul_cross_group_gram
    num_relevant, pos_scores, pos_index = _sorted_gallery_positive_scores(
        queries, query_classes, gallery, gallery_classes, gram
    )
    num_queries, max_r = pos_scores.shape
    if max_r == 0:
        return PositiveRanks(num_relevant, np.zeros((num_queries, 0), dtype=np.int64))
    if use_numba:
        size = block_size or CPU_BLOCK_SIZE
        precision = resolve_screen(screen, queries.shape[1])
        counts = _count_gallery_with_numba(
            queries, query_classes, gallery, gallery_classes, num_relevant, pos_scores, pos_index, max_k, size,
            precision,
        )  # fmt: skip
    else:
        device = torch.device(device)
        size = block_size or (CUDA_BLOCK_SIZE if device.type == "cuda" else CPU_BLOCK_SIZE)
        counts = _count_gallery_with_torch(
            queries, query_classes, gallery, gallery_classes, num_relevant, pos_scores, pos_index, size, device
        )
    return PositiveRanks(num_relevant, np.cumsum(counts, axis=1))


# ------------------------------------------------------------------------------------------------------------------
# Phase 1: each query's positives, from its class's own Gram matrix


def _matmul_group_gram(x: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Scores among the members of each group, shape (C, n, n), by BLAS; the diagonal (the query) is -inf.

    In float64 rounded to float32, as :func:`_count_with_torch` scores the negatives (see there).
    """
    vectors = x[members].astype(np.float64)  # (C, n, D)
    gram = np.matmul(vectors, vectors.transpose(0, 2, 1)).astype(np.float32)
    size = members.shape[1]
    # The query itself is excluded by position (not by score, which duplicates share).
    gram[:, np.arange(size), np.arange(size)] = -np.inf
    return gram


def _sorted_positive_scores(
    x: np.ndarray, classes: np.ndarray, gram_of: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's positive scores, best first (ties: lower index first), padded to the largest class.

    ``gram_of(x, members)`` gives the scores among the members of each of a batch of equal-size classes.

    Returns:
        ``(num_relevant, scores, indices)``: R per query, and arrays of shape (N, R_max) holding the positives'
        scores (float32, non-increasing; padding -inf) and item indices (int64; padding -1).
    """
    num_items = len(classes)
    order = np.argsort(classes, kind="stable")  # members of each class in increasing index order
    sizes = np.bincount(classes)
    num_relevant = (sizes[classes] - 1).astype(np.int64)
    max_r = int(sizes.max()) - 1
    scores = np.full((num_items, max_r), -np.inf, dtype=np.float32)
    indices = np.full((num_items, max_r), -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # NOTE: classes of equal size are stacked and multiplied as one batch: SOP's 11k classes take ~10 calls.
    for size in np.unique(sizes):
        if size < 2:
            continue
        group = np.flatnonzero(sizes == size)
        per_batch = max(1, GRAM_BUDGET // (size * size))
        for begin in range(0, len(group), per_batch):
            members = starts[group[begin : begin + per_batch], None] + np.arange(size)  # (C, n) positions in order
            members = order[members]
            gram = gram_of(x, members)
            member_index = np.broadcast_to(members[:, None, :], gram.shape)
            # np.lexsort sorts by its last key first: decreasing score, then increasing index.
            rank = np.lexsort((member_index, -gram), axis=-1)[..., : size - 1]
            scores[members, : size - 1] = np.take_along_axis(gram, rank, axis=-1)
            indices[members, : size - 1] = np.take_along_axis(member_index, rank, axis=-1)
    return num_relevant, scores, indices


def _matmul_cross_group_gram(
    queries: np.ndarray, query_members: np.ndarray, gallery: np.ndarray, gallery_members: np.ndarray
) -> np.ndarray:
    """Scores of each group's queries with its gallery items, shape (C, n_query, n_gallery), by BLAS.

    In float64 rounded to float32, as :func:`_count_gallery_with_torch` scores the negatives (see there).
    """
    left = queries[query_members].astype(np.float64)
    return np.matmul(left, gallery[gallery_members].astype(np.float64).transpose(0, 2, 1)).astype(np.float32)


def _sorted_gallery_positive_scores(
    queries: np.ndarray,
    query_classes: np.ndarray,
    gallery: np.ndarray,
    gallery_classes: np.ndarray,
    gram_of: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's scores with the gallery items of its class, best first (ties: lower gallery index first).

    The query / gallery counterpart of :func:`_sorted_positive_scores`: ``gram_of(queries, query_members, gallery,
    gallery_members)`` scores a batch of classes with equal numbers of queries and of gallery items.

    Returns:
        ``(num_relevant, scores, indices)``: R per query (its class's gallery items), and arrays of shape
        (Q, R_max) holding the positives' scores (float32, non-increasing; padding -inf) and gallery indices
        (int64; padding -1).
    """
    num_classes = int(max(query_classes.max(initial=-1), gallery_classes.max(initial=-1))) + 1
    query_sizes = np.bincount(query_classes, minlength=num_classes)
    gallery_sizes = np.bincount(gallery_classes, minlength=num_classes)
    num_relevant = gallery_sizes[query_classes].astype(np.int64)
    max_r = int(num_relevant.max(initial=0))
    scores = np.full((len(queries), max_r), -np.inf, dtype=np.float32)
    indices = np.full((len(queries), max_r), -1, dtype=np.int64)
    query_order = np.argsort(query_classes, kind="stable")  # each class's members in increasing index order
    gallery_order = np.argsort(gallery_classes, kind="stable")
    query_starts = np.concatenate([[0], np.cumsum(query_sizes)[:-1]])
    gallery_starts = np.concatenate([[0], np.cumsum(gallery_sizes)[:-1]])
    searched = (query_sizes > 0) & (gallery_sizes > 0)
    # NOTE: classes with equal (query count, gallery count) are stacked and scored as one batch.
    for num_q, num_g in np.unique(np.stack([query_sizes[searched], gallery_sizes[searched]], axis=1), axis=0):
        group = np.flatnonzero(searched & (query_sizes == num_q) & (gallery_sizes == num_g))
        per_batch = max(1, GRAM_BUDGET // int(num_q * num_g))
        for begin in range(0, len(group), per_batch):
            batch = group[begin : begin + per_batch]
            query_members = query_order[query_starts[batch, None] + np.arange(num_q)]  # (C, num_q)
            gallery_members = gallery_order[gallery_starts[batch, None] + np.arange(num_g)]  # (C, num_g)
            gram = gram_of(queries, query_members, gallery, gallery_members)
            member_index = np.broadcast_to(gallery_members[:, None, :], gram.shape)
            # np.lexsort sorts by its last key first: decreasing score, then increasing gallery index.
            rank = np.lexsort((member_index, -gram), axis=-1)
            scores[query_members, :num_g] = np.take_along_axis(gram, rank, axis=-1)
            indices[query_members, :num_g] = np.take_along_axis(member_index, rank, axis=-1)
    return num_relevant, scores, indices


# ------------------------------------------------------------------------------------------------------------------
# Phase 2 on the CPU: a screening matrix product over blocks of the upper triangle, exact scores for the survivors


def _upper_triangle_blocks(num_items: int, block_rows: int, block_cols: int) -> Iterator[tuple[slice, slice, int]]:
    """Tiles the upper triangle (diagonal included) of an N x N matrix into blocks.

    Yields:
        ``(rows, cols, first)``: a block, and the first of its columns that is not also one of its rows. The
        row pass of a block covers each row query's pairs with all the block's columns; the pairs of the column
        queries from ``first`` on, with these rows, lie below the diagonal and are taken from the same block,
        transposed. Every unordered pair is visited once per direction.
    """
    for row0 in range(0, num_items, block_rows):
        rows = slice(row0, min(row0 + block_rows, num_items))
        for col0 in range(row0, num_items, block_cols):
            cols = slice(col0, min(col0 + block_cols, num_items))
            yield rows, cols, max(rows.stop - col0, 0)


def _count_with_numba(
    x: np.ndarray,
    classes: np.ndarray,
    num_relevant: np.ndarray,
    pos_scores: np.ndarray,
    pos_index: np.ndarray,
    max_k: int,
    block_size: int,
    precision: str,
) -> np.ndarray:
    """Histogram (N, R_max): bin m counts the negatives whose first beaten positive is the (m+1)-th.

    The block product (int8, bfloat16 or float32) screens the pairs: every pair that may lie within
    :func:`screen_margin` of a query's threshold is rescored with :func:`exact_score`.
    """
    num_items, max_r = pos_scores.shape
    margin = screen_margin(precision, x)
    scale = int8_scale(x) if precision == "int8" else 1.0
    counts = np.zeros((num_items, max_r), dtype=np.int64)
    # The lowest positive (0-based) whose count still matters; -1 once nothing about the query can change.
    last_live = num_relevant - 1
    block_rows = min(block_size, num_items)
    # NOTE: thin blocks (a few rows) would make a kernel call per handful of scores; columns stay wide.
    block_cols = min(max(block_size, CPU_BLOCK_SIZE), num_items)
    chunks = numba.get_num_threads()  # column chunks, one per thread
    row_counts = np.empty((chunks, block_rows, max_r), dtype=np.int64)  # each thread's counts of the row queries
    operands, out_dtype = screen_operands(precision, x, scale)
    buffer = torch.empty(block_rows * block_cols, dtype=out_dtype)
    if precision == "float32":
        col_keys, never = np.empty(block_cols, dtype=np.float32), np.float32(np.inf)
    else:
        col_keys, never = np.empty(block_cols, dtype=np.int32), np.iinfo(np.int32).max
    for rows, cols, first in _upper_triangle_blocks(num_items, block_rows, block_cols):
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        block = buffer[: shape[0] * shape[1]].view(shape)
        screen_product(precision, operands[rows], operands[cols], block)
        block = block.view(torch.int16).numpy() if precision == "bfloat16" else block.numpy()
        # The block's columns from `first` on are queries too: their pairs with these rows are below the diagonal.
        queries = slice(cols.start + first, cols.stop)
        row_state = _thresholds(pos_scores, pos_index, last_live, rows)
        col_state = _thresholds(pos_scores, pos_index, last_live, queries)
        row_keys = screen_keys(row_state[1], margin, precision, scale)
        block_col_keys = col_keys[: shape[1]]
        block_col_keys[:first] = never  # not queries of this block
        block_col_keys[first:] = screen_keys(col_state[1], margin, precision, scale)
        block_counts = row_counts[:, : shape[0]]
        block_counts.fill(0)
        count_block(block, row_keys, block_col_keys, x, rows.start, cols.start, first, classes,
                     pos_scores, pos_index, *row_state, *col_state, counts, block_counts)  # fmt: skip
        counts[rows] += block_counts.sum(axis=0)
        _update_liveness(counts, num_relevant, last_live, rows, max_k)
        if first < shape[1]:
            _update_liveness(counts, num_relevant, last_live, queries, max_k)
    return counts


def _count_gallery_with_numba(
    queries: np.ndarray,
    query_classes: np.ndarray,
    gallery: np.ndarray,
    gallery_classes: np.ndarray,
    num_relevant: np.ndarray,
    pos_scores: np.ndarray,
    pos_index: np.ndarray,
    max_k: int,
    block_size: int,
    precision: str,
) -> np.ndarray:
    """The histogram of :func:`_count_with_numba` for queries (rows) searched in a separate gallery (columns).

    Blocks of queries x gallery items, each counted for its row queries only; a block of rows stops early once
    none of its queries has a positive left that can change a metric.
    """
    num_queries, max_r = pos_scores.shape
    margin = screen_margin(precision, queries, gallery)
    scale = int8_scale(queries, gallery) if precision == "int8" else 1.0
    counts = np.zeros((num_queries, max_r), dtype=np.int64)
    last_live = num_relevant - 1  # as in _count_with_numba
    block_rows = min(block_size, num_queries)
    block_cols = min(max(block_size, CPU_BLOCK_SIZE), len(gallery))
    query_operands, out_dtype = screen_operands(precision, queries, scale)
    gallery_operands, _ = screen_operands(precision, gallery, scale)
    buffer = torch.empty(block_rows * block_cols, dtype=out_dtype)
    for row0 in range(0, num_queries, block_rows):
        rows = slice(row0, min(row0 + block_rows, num_queries))
        for col0 in range(0, len(gallery), block_cols):
            live, threshold, tie = _thresholds(pos_scores, pos_index, last_live, rows)
            if live.max() < 0:
                break
            cols = slice(col0, min(col0 + block_cols, len(gallery)))
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            block = buffer[: shape[0] * shape[1]].view(shape)
            screen_product(precision, query_operands[rows], gallery_operands[cols], block)
            block = block.view(torch.int16).numpy() if precision == "bfloat16" else block.numpy()
            keys = screen_keys(threshold, margin, precision, scale)
            count_gallery_block(block, keys, queries, gallery, rows.start, cols.start, query_classes,
                                gallery_classes, pos_scores, pos_index, live, threshold, tie, counts)  # fmt: skip
            _update_liveness(counts, num_relevant, last_live, rows, max_k)
    return counts


def _thresholds(
    pos_scores: np.ndarray, pos_index: np.ndarray, last_live: np.ndarray, queries: slice
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: the lowest positive that still matters, its score (+inf when none does) and its index."""
    live = last_live[queries].copy()
    rows = np.arange(queries.start, queries.stop)
    column = np.maximum(live, 0)
    threshold = np.where(live >= 0, pos_scores[rows, column], np.float32(np.inf)).astype(np.float32)
    return live, threshold, pos_index[rows, column]


def _update_liveness(
    counts: np.ndarray, num_relevant: np.ndarray, last_live: np.ndarray, queries: slice, max_k: int
) -> None:
    """Lowers each query's last positive that matters, after its counts grew.

    The (m+1)-th positive can still be in the top R while ``m + 1 + negatives_before <= R``; that holds for a
    prefix of the positives, since both terms grow with m. The first positive also matters while its count is
    below ``max_k`` (Recall@K). Counts only grow, so a positive that stopped mattering never matters again.
    """
    before = np.cumsum(counts[queries], axis=1)
    relevant = num_relevant[queries]
    position = np.arange(1, counts.shape[1] + 1)
    within_r = (position[None, :] + before <= relevant[:, None]) & (position[None, :] <= relevant[:, None])
    last = np.count_nonzero(within_r, axis=1) - 1
    needed_for_recall = (relevant > 0) & (before[:, 0] < max_k)
    last_live[queries] = np.where(needed_for_recall, np.maximum(last, 0), last)


# ------------------------------------------------------------------------------------------------------------------
# Phase 2 with torch (GPU; also runs on the CPU): exact, vectorised, no pruning


def _sortable_keys(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """One int64 per (score, item) ordered as the neighbour lists are: higher score first, then lower index.

    The float32 bits of the score become an order-preserving int32 (negative floats have their magnitude bits
    flipped) in the high half; the complemented item index fills the low half.
    """
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, which compare equal as floats
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(torch.int64) << 32) + (0xFFFFFFFF - items)


def _count_with_torch(
    x: np.ndarray,
    classes: np.ndarray,
    num_relevant: np.ndarray,
    pos_scores: np.ndarray,
    pos_index: np.ndarray,
    block_size: int,
    device: torch.device,
) -> np.ndarray:
    """The histogram of :func:`_count_with_numba`, counting every negative (exact everywhere).

    The scores are float64 products rounded to float32, for the reason :func:`_count_gallery_with_torch` gives: a
    float32 product rounds the scores of exact copies differently at different places of the matrix (and phase 1
    scores the positives in another product), so a negative copy of a positive would tie with it or not by chance.
    (In float64, TF32 never applies either.)
    """
    num_items, max_r = pos_scores.shape
    bins = max_r + 1  # the last bin collects negatives that beat no positive, and same-class pairs
    xt = torch.from_numpy(x).to(device, torch.float64)
    cls = torch.from_numpy(classes).to(device)
    ascending = _ascending_positive_keys(pos_scores, pos_index, device)
    relevant = torch.from_numpy(num_relevant).to(device)
    counts = torch.zeros(num_items * bins, dtype=torch.int64, device=device)
    item_ids = torch.arange(num_items, device=device)

    def add(scores: torch.Tensor, queries: slice, items: slice) -> None:
        """Bins every (query, item) pair of ``scores``, whose rows are the queries."""
        _bin_pairs(scores, item_ids[queries], cls[queries], item_ids[items], cls[items], ascending[queries],
                   relevant[queries], counts, bins)  # fmt: skip

    for rows, cols, first in _upper_triangle_blocks(num_items, block_size, block_size):
        scores = (xt[rows] @ xt[cols].T).to(torch.float32)
        add(scores, rows, cols)
        if first < scores.shape[1]:
            add(scores[:, first:].T, slice(cols.start + first, cols.stop), rows)
    return counts.view(num_items, bins)[:, :max_r].cpu().numpy()


def _count_gallery_with_torch(
    queries: np.ndarray,
    query_classes: np.ndarray,
    gallery: np.ndarray,
    gallery_classes: np.ndarray,
    num_relevant: np.ndarray,
    pos_scores: np.ndarray,
    pos_index: np.ndarray,
    block_size: int,
    device: torch.device,
) -> np.ndarray:
    """The histogram of :func:`_count_gallery_with_numba`, counting every negative (exact everywhere).

    The scores are float64 products rounded to float32: BLAS rounds a float32 product of exact copies of a gallery
    item differently at different places of a matrix, and phase 1 scores the positives in another product
    (:func:`_matmul_cross_group_gram`), so a copy would tie with its positive or not by chance. The float64 sums of
    copies differ by far less than a float32 step, so they round to the same float32 score and tie (unless they
    straddle a rounding boundary, about once in 10^9 pairs); the numba path ties them by construction.
    """
    num_queries, max_r = pos_scores.shape
    bins = max_r + 1
    qt = torch.from_numpy(queries).to(device, torch.float64)
    gt = torch.from_numpy(gallery).to(device, torch.float64)
    query_cls = torch.from_numpy(query_classes).to(device)
    gallery_cls = torch.from_numpy(gallery_classes).to(device)
    ascending = _ascending_positive_keys(pos_scores, pos_index, device)
    relevant = torch.from_numpy(num_relevant).to(device)
    counts = torch.zeros(num_queries * bins, dtype=torch.int64, device=device)
    query_ids = torch.arange(num_queries, device=device)
    gallery_ids = torch.arange(len(gallery), device=device)
    for row0 in range(0, num_queries, block_size):
        rows = slice(row0, min(row0 + block_size, num_queries))
        for col0 in range(0, len(gallery), block_size):
            cols = slice(col0, min(col0 + block_size, len(gallery)))
            scores = (qt[rows] @ gt[cols].T).to(torch.float32)
            _bin_pairs(scores, query_ids[rows], query_cls[rows], gallery_ids[cols], gallery_cls[cols],
                       ascending[rows], relevant[rows], counts, bins)  # fmt: skip
    return counts.view(num_queries, bins)[:, :max_r].cpu().numpy()


def _ascending_positive_keys(pos_scores: np.ndarray, pos_index: np.ndarray, device: torch.device) -> torch.Tensor:
    """Each query's positive keys in ascending order, padding (smaller than every real key) first."""
    keys = _sortable_keys(torch.from_numpy(pos_scores).to(device), torch.from_numpy(pos_index).to(device))
    keys = torch.where(torch.from_numpy(pos_index >= 0).to(device), keys, torch.iinfo(torch.int64).min)
    return keys.flip(1).contiguous()  # searchsorted needs ascending rows


def _bin_pairs(
    scores: torch.Tensor,
    query_ids: torch.Tensor,
    query_classes: torch.Tensor,
    item_ids: torch.Tensor,
    item_classes: torch.Tensor,
    ascending: torch.Tensor,
    relevant: torch.Tensor,
    counts: torch.Tensor,
    bins: int,
) -> None:
    """Bins every (query, item) pair of ``scores`` (rows: the queries, columns: the items) into ``counts``.

    ``ascending`` and ``relevant`` are the rows' positive keys (:func:`_ascending_positive_keys`) and R; a pair
    counts in the bin of the first positive its item beats, and same-class pairs and pairs that beat no positive
    in the last bin.
    """
    max_r = bins - 1
    negative_keys = _sortable_keys(scores, item_ids[None, :]).contiguous()  # rows of a transposed block too
    # The number of positive keys above the negative's key is the index of the first positive it beats.
    first_beaten = max_r - torch.searchsorted(ascending, negative_keys, right=True)
    unused = (first_beaten >= relevant[:, None]) | (query_classes[:, None] == item_classes[None, :])
    first_beaten = torch.where(unused, max_r, first_beaten)
    flat = (query_ids[:, None] * bins + first_beaten).reshape(-1)
    counts.index_add_(0, flat, torch.ones_like(flat))
