"""The compiled (numba) kernels of the CPU evaluation: exact scores, per-class Gram matrices, and the screened count.

Used by :mod:`metricsearch.metrics.positive_ranks`. Every score that decides a metric comes from
:func:`exact_score` (a query = gallery set) or :func:`exact_cross_score` (queries searched in a separate gallery),
one fixed float32 inner product each, so that exact copies of an item tie exactly wherever their scores are
computed.
"""

from __future__ import annotations

import numpy as np

try:  # numba ships with umap-learn; without it the torch implementation runs on the CPU (correct, slower).
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = [
    "count_block",
    "count_gallery_block",
    "cross_group_gram",
    "exact_cross_score",
    "exact_score",
    "group_gram",
    "numba_available",
]


# Multiply-adds below which a kernel call runs on one thread (about 10 ms of work).
PARALLEL_MIN_WORK = 1 << 26


def numba_available() -> bool:
    """Whether the compiled CPU kernel is available (else the CPU runs the torch implementation)."""
    return numba is not None


def _screen_key(value):  # pragma: no cover - replaced by the compiled overloads below
    raise NotImplementedError


if numba is not None:

    @numba.extending.overload(_screen_key, inline="always")
    def _screen_key_overload(value):
        """The comparable key of a screening score: float32 and int32 as they are, bfloat16 bits made ordered."""
        if isinstance(value, numba.types.Float):
            return lambda value: value
        if isinstance(value, numba.types.Integer) and value.bitwidth == 32:  # int8 products: already integers
            return lambda value: value
        if isinstance(value, numba.types.Integer) and value.bitwidth == 16:
            # Negative numbers have their magnitude bits flipped: larger magnitude, smaller key.
            return lambda value: np.int32(value) ^ ((np.int32(value) >> np.int32(15)) & np.int32(0x7FFF))
        return None

    # NOTE: reassociation lets LLVM vectorise the sum (4x faster). The order it picks depends only on the loop and
    # the CPU, so a pair gets the same score wherever it is computed (phase 1, either direction of phase 2), and
    # exact copies of an item tie exactly.
    @numba.njit(cache=True, fastmath={"reassoc"}, nogil=True)
    def exact_score(x, a, b):  # pragma: no cover - compiled
        """The float32 inner product of rows ``a`` and ``b``: the score every decision of this module uses."""
        p = x[a]
        q = x[b]
        total = np.float32(0.0)
        for k in range(p.shape[0]):
            total += p[k] * q[k]
        return total

    @numba.njit(cache=True, fastmath={"reassoc"}, nogil=True)
    def exact_cross_score(queries, a, gallery, b):  # pragma: no cover - compiled
        """The float32 inner product of query ``a`` and gallery item ``b``: :func:`exact_score`'s loop, two matrices.

        Every decision of a query / gallery search uses it (phase 1 and phase 2), so that a query's scores with
        exact copies of a gallery item are equal.
        """
        p = queries[a]
        q = gallery[b]
        total = np.float32(0.0)
        for k in range(p.shape[0]):
            total += p[k] * q[k]
        return total

    @numba.njit(cache=True, parallel=True, nogil=True)
    def group_gram(x, members):  # pragma: no cover - compiled
        """Exact scores among the members of each group, shape (C, n, n); the diagonal (the query) is -inf."""
        num_groups, size = members.shape
        gram = np.empty((num_groups, size, size), dtype=np.float32)
        for g in numba.prange(num_groups):
            for a in range(size):
                gram[g, a, a] = -np.inf
                for b in range(a + 1, size):
                    s = exact_score(x, members[g, a], members[g, b])
                    gram[g, a, b] = s
                    gram[g, b, a] = s
        return gram

    @numba.njit(cache=True, inline="always")
    def _fill_cross_gram(gram, g, queries, query_members, gallery, gallery_members):  # pragma: no cover - compiled
        for a in range(query_members.shape[1]):
            for b in range(gallery_members.shape[1]):
                gram[g, a, b] = exact_cross_score(queries, query_members[g, a], gallery, gallery_members[g, b])

    @numba.njit(cache=True, parallel=True, nogil=True)
    def _cross_group_gram_parallel(queries, query_members, gallery, gallery_members):  # pragma: no cover - compiled
        gram = np.empty((len(query_members), query_members.shape[1], gallery_members.shape[1]), dtype=np.float32)
        for g in numba.prange(len(query_members)):
            _fill_cross_gram(gram, g, queries, query_members, gallery, gallery_members)
        return gram

    @numba.njit(cache=True, nogil=True)
    def _cross_group_gram_serial(queries, query_members, gallery, gallery_members):  # pragma: no cover - compiled
        gram = np.empty((len(query_members), query_members.shape[1], gallery_members.shape[1]), dtype=np.float32)
        for g in range(len(query_members)):
            _fill_cross_gram(gram, g, queries, query_members, gallery, gallery_members)
        return gram

    def cross_group_gram(queries, query_members, gallery, gallery_members):
        """Exact scores of each group's queries with the group's gallery items, shape (C, n_query, n_gallery).

        Threads only for batches worth them: phase 1 makes a call per (query count, gallery count) pair (78 at
        In-Shop size, 23 M multiply-adds in all), and on a loaded machine each parallel region waited for a
        descheduled thread (1 s for In-Shop's phase 1 instead of 0.02 s).
        """
        work = query_members.size * gallery_members.shape[1] * queries.shape[1]
        kernel = _cross_group_gram_parallel if work >= PARALLEL_MIN_WORK else _cross_group_gram_serial
        return kernel(queries, query_members, gallery, gallery_members)

    @numba.njit(cache=True, inline="always")
    def _first_beaten(score, item, pos_scores, pos_index, query, last):  # pragma: no cover - compiled
        """Binary search: the first of positives 0..last (sorted best first) that ``item`` with ``score`` beats.

        Beating is monotone along the sorted positives; the caller has checked that ``last`` is beaten.
        """
        low, high = 0, last
        while low < high:
            mid = (low + high) // 2
            s = pos_scores[query, mid]
            if score > s or (score == s and item < pos_index[query, mid]):
                high = mid
            else:
                low = mid + 1
        return low

    @numba.njit(cache=True, parallel=True, nogil=True)
    def count_block(
        screen, row_keys, col_keys, x, row0, col0, first, classes, pos_scores, pos_index,
        row_live, row_threshold, row_tie, col_live, col_threshold, col_tie, counts, row_counts,
    ):  # pragma: no cover - compiled  # fmt: skip
        """One pass over a screened block for its row queries and, from column ``first`` on, its column queries.

        ``screen`` holds approximate scores (float32, the int16 bits of bfloat16, or int32 products of int8
        codes), compared through
        :func:`_screen_key` with the keys of :func:`screen_keys`. A score below the row query's key and the column
        query's key, the common case, costs two comparisons; a pair that passes either gets its exact score, which
        alone decides whether and where it counts (a pair can pass for one query and count for the other only
        if its exact score beats that query's threshold, which implies it passed for it: the check is safe).

        The columns are split among the threads: a thread owns the column queries of its chunk and updates their
        counts in place, and keeps its own counts of the row queries (which every thread sees) in
        ``row_counts[chunk]``, summed by the caller.
        """
        num_rows, num_cols = screen.shape
        num_chunks = row_counts.shape[0]
        width = (num_cols + num_chunks - 1) // num_chunks
        for chunk in numba.prange(num_chunks):
            begin = chunk * width
            end = min(begin + width, num_cols)
            split = min(max(first, begin), end)  # columns before it are not queries of this block
            for i in range(num_rows):
                row_key = row_keys[i]
                row_item = row0 + i
                row_class = classes[row_item]
                for j in range(begin, split):
                    if _screen_key(screen[i, j]) >= row_key:
                        item = col0 + j
                        if classes[item] != row_class:
                            s = exact_score(x, row_item, item)
                            if s > row_threshold[i] or (s == row_threshold[i] and item < row_tie[i]):
                                m = _first_beaten(s, item, pos_scores, pos_index, row_item, row_live[i])
                                row_counts[chunk, i, m] += 1
                for j in range(split, end):
                    key = _screen_key(screen[i, j])
                    for_row = key >= row_key
                    if for_row or key >= col_keys[j]:
                        item = col0 + j
                        if classes[item] == row_class:
                            continue
                        s = exact_score(x, row_item, item)
                        if for_row and (s > row_threshold[i] or (s == row_threshold[i] and item < row_tie[i])):
                            m = _first_beaten(s, item, pos_scores, pos_index, row_item, row_live[i])
                            row_counts[chunk, i, m] += 1
                        q = j - first
                        if s > col_threshold[q] or (s == col_threshold[q] and row_item < col_tie[q]):
                            m = _first_beaten(s, row_item, pos_scores, pos_index, item, col_live[q])
                            counts[item, m] += 1

    @numba.njit(cache=True, parallel=True, nogil=True)
    def count_gallery_block(
        screen, row_keys, queries, gallery, row0, col0, query_classes, gallery_classes, pos_scores, pos_index,
        row_live, row_threshold, row_tie, counts,
    ):  # pragma: no cover - compiled  # fmt: skip
        """One pass over a screened block of queries (rows) x gallery items (columns), for the row queries only.

        The query / gallery counterpart of :func:`count_block`: the gallery items are not queries, so nothing is
        counted for the columns. A pair whose screening key reaches the row's key gets its exact score
        (:func:`exact_cross_score`), which alone decides whether and where it counts. The rows are split among the
        threads, each owning its rows' counts; a finished row (no positive left that can change a metric) is
        skipped whole.
        """
        num_rows, num_cols = screen.shape
        for i in numba.prange(num_rows):
            if row_live[i] < 0:
                continue
            row_key = row_keys[i]
            query = row0 + i
            query_class = query_classes[query]
            for j in range(num_cols):
                if _screen_key(screen[i, j]) >= row_key:
                    item = col0 + j
                    if gallery_classes[item] != query_class:
                        s = exact_cross_score(queries, query, gallery, item)
                        if s > row_threshold[i] or (s == row_threshold[i] and item < row_tie[i]):
                            m = _first_beaten(s, item, pos_scores, pos_index, query, row_live[i])
                            counts[query, m] += 1

else:  # pragma: no cover

    def _missing(*args):
        raise RuntimeError("numba is not installed")

    count_block = count_gallery_block = cross_group_gram = exact_cross_score = exact_score = group_gram = _missing
