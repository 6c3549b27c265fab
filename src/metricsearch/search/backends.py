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

from metricsearch.search.errors import SearchError
from metricsearch.search.index import GalleryIndex
from metricsearch.search.index_metadata import read_metadata
from metricsearch.search.milvus_index import BACKENDS, MilvusGalleryIndex
from metricsearch.utils.messages import shorten

AnyIndex = GalleryIndex | MilvusGalleryIndex

# How many more candidates each round of a filtered faiss search asks for.
WIDENING = 4


def load_gallery_index(
    folder: str | Path,
    gallery_root: str | Path | None = None,
    backend: str | None = None,
    uri: str | Path | None = None,
) -> AnyIndex:
    """The index in ``folder``, whichever backend holds it.

    Args:
        folder: the index folder.
        gallery_root: where the gallery images are now, if they moved since the index was built.
        backend: ``index.backend=`` as the user gave it: the backend the folder must hold (None: any).
        uri: ``index.uri=``: where a Milvus index's collection is now (a Lite file or a server URL), instead of the
            one its metadata records; refused for a faiss index.

    Raises:
        IndexLoadError: no finished index there, or a damaged one (see each backend's ``load``).
        SearchError: ``backend`` is not the one the folder holds, or ``uri`` is given for a faiss index.
    """
    folder = Path(folder).expanduser().resolve()
    if check_index_choice(folder, backend, uri) == "milvus":
        return MilvusGalleryIndex.load(folder, gallery_root=gallery_root, uri=uri)
    return GalleryIndex.load(folder, gallery_root=gallery_root)


def check_index_choice(folder: str | Path, backend: str | None = None, uri: str | Path | None = None) -> str:
    """The backend of the index in ``folder``, once ``index.backend=`` / ``index.uri=`` are checked to fit it.

    Raises:
        IndexLoadError: no finished index in ``folder``.
        SearchError: an unknown backend, another backend than the folder's, or a uri for a faiss index.
    """
    if backend is not None and backend not in BACKENDS:
        raise SearchError(f"index.backend={shorten(backend)} is not one of {', '.join(BACKENDS)}")
    folder = Path(folder).expanduser().resolve()
    held = read_metadata(folder).get("backend", "faiss")
    if backend is not None and backend != held:
        raise SearchError(
            f"index={folder} is a {held if held in BACKENDS else shorten(held)} index, not index.backend={backend}: "
            "leave index.backend= out (the index folder says which backend holds it) or name an index of that backend"
        )
    if uri and held != "milvus":
        raise SearchError(
            f"index.uri= names where a Milvus collection is, but index={folder} is a faiss index (its vectors are "
            "files in the folder): leave index.uri= out"
        )
    return held


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
