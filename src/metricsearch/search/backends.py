"""The index backends behind one interface: faiss in the index folder (the default) or a Milvus collection.

An index folder's ``metadata.json`` says which backend holds its vectors (``backend``: ``faiss`` when absent);
:func:`load_gallery_index` opens either. Both index classes answer the same calls (``search`` with an optional
filter, ``add``, ``remove``, ``embedding_of``, ``check_embedder``, ``paths``, ``labels``, ``ids``), so the
commands and the server never ask which one they hold.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from metricsearch.search.index import GalleryIndex
from metricsearch.search.index_metadata import read_metadata
from metricsearch.search.milvus_index import MilvusGalleryIndex

AnyIndex = GalleryIndex | MilvusGalleryIndex

# How many more candidates each round of a filtered faiss search asks for.
WIDENING = 4


def load_gallery_index(folder: str | Path, gallery_root: str | Path | None = None) -> AnyIndex:
    """The index in ``folder``, whichever backend holds it.

    Raises:
        IndexLoadError: no finished index there, or a damaged one (see each backend's ``load``).
    """
    folder = Path(folder).expanduser().resolve()
    if read_metadata(folder).get("backend", "faiss") == "milvus":
        return MilvusGalleryIndex.load(folder, gallery_root=gallery_root)
    return GalleryIndex.load(folder, gallery_root=gallery_root)


def filtered_search(
    index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray
) -> list[list[tuple[int, float]]]:
    """The top ``k`` (row, score) of each query among the rows where ``allowed`` is true: an exact post-filter.

    Each query asks faiss for more candidates than ``k`` and keeps the allowed ones; while fewer than ``k`` are
    kept and faiss has not yet returned every row, it asks again for ``WIDENING`` times as many. So a search
    returns ``k`` results whenever ``k`` images pass the filter, and on an exact index they are exactly the
    best ``k`` of those images (the ranking among allowed rows is the unfiltered ranking, restricted).
    """
    total, wanted = index.ntotal, min(k, int(allowed.sum()))
    results = []
    for query in queries:
        fetch = min(total, max(WIDENING * k, 64))
        while True:
            scores, rows = index.search(query[None], fetch)
            kept = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0 and allowed[r]]
            if len(kept) >= wanted or fetch >= total:
                break
            fetch = min(total, fetch * WIDENING)
        results.append(kept[:k])
    return results
