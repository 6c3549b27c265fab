"""The index a server answers from: the one its folder holds now, reopened when another process changes it.

``scripts/build_index.py add=true`` (or ``remove=``) commits a change by replacing the index's ``metadata.json``
atomically. :meth:`LiveIndex.current` compares that file's identity (inode, size, modification time) with the one
it opened, and reopens the index when it differs, so the page and the API show the gallery as it is. The model is
checked again on every reopening; an index rebuilt with another model is refused and the previous one is kept.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from metricsearch.inference.model_loading import Embedder
from metricsearch.search.backends import AnyIndex, load_gallery_index
from metricsearch.search.errors import SearchError
from metricsearch.search.index_metadata import METADATA_NAME

log = logging.getLogger(__name__)


def _stamp(folder: Path) -> tuple[int, int, int] | None:
    try:
        status = os.stat(folder / METADATA_NAME)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


class LiveIndex:
    """An index kept up to date with its folder (see the module docstring).

    Args:
        index: the index as opened; one only in memory (no folder) never changes.
        embedder: the model it was checked against.
        gallery: where the gallery images are, when the server was told (they moved since indexing).
        uri: where a Milvus index's collection is, when the server was told (``index.uri=``).
    """

    def __init__(
        self, index: AnyIndex, embedder: Embedder, gallery: str | Path | None = None, uri: str | None = None
    ) -> None:
        self._index = index
        self._embedder = embedder
        self._gallery = gallery
        self._uri = uri
        self._folder = Path(index.folder) if index.folder else None
        self._stamp = _stamp(self._folder) if self._folder else None
        self._lock = threading.Lock()

    def current(self) -> AnyIndex:
        """The index as its folder holds it now."""
        if self._folder is None or _stamp(self._folder) == self._stamp:
            return self._index
        with self._lock:
            stamp = _stamp(self._folder)
            if stamp is not None and stamp != self._stamp:
                try:
                    fresh = load_gallery_index(self._folder, gallery_root=self._gallery, uri=self._uri)
                    fresh.check_embedder(self._embedder)
                except SearchError as err:
                    log.error("Keeping the index as it was: its folder changed into one this server refuses: %s", err)
                else:
                    log.info("The index changed on disk: now %d images", len(fresh))
                    self._index = fresh
                self._stamp = stamp
        return self._index
