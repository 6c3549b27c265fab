"""A gallery index on disk: a faiss index, the embeddings, the image paths and labels, and the model's identity.

Layout of an index folder::

    metadata.json              what the index is: model fingerprint and source, embedding size, preprocessing,
                               index kind and parameters, gallery root, relative paths and labels, and the
                               names of the two data files below
    vectors-<token>.faiss      the faiss index (exact inner product, IVF or HNSW)
    embeddings-<token>.npy     the embeddings themselves, so the index can be rebuilt with another kind
                               (or retrained after the gallery grew) without re-embedding a single image

Saving is atomic without ever moving the folder: the data files get fresh names, each written atomically,
and ``metadata.json`` (also written atomically) is the commit that switches to them; the files it no longer
names are removed afterwards, and so are the temporary files of a writer that was killed mid-save. A crash at
any point leaves either the previous index or the new one, both complete, and a folder that never got a
``metadata.json`` is refused as unfinished.

``metadata.json`` also records the size and SHA-256 of each data file, checked when the index is loaded: a
data file truncated, replaced or corrupted after the index was saved is refused with a message that names it
and gives the command that rebuilds the index, instead of faiss's or numpy's own error (or wrong results).

Scores are inner products; the project's embeddings are L2-normalised, so they are cosine similarities.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import faiss
import numpy as np

from metricsearch.inference.errors import ModelLoadError
from metricsearch.inference.model_choice import ModelChoice, given_choice
from metricsearch.inference.model_loading import Embedder, load_embedder, load_embedder_from_source
from metricsearch.search.errors import IndexLoadError, IndexMismatchError, RequestError, SearchError
from metricsearch.search.filters import SearchFilter
from metricsearch.search.index_metadata import (
    INDEX_KINDS,
    METADATA_NAME,
    MIN_POINTS_PER_LIST,
    check_data_file,
    common_metadata,
    damaged_message,
    is_index_file_name,
    now_iso,
    read_metadata,
    rebuild_command,
    write_data_file,
)
from metricsearch.utils.atomic_io import atomic_write_text, remove_orphaned_temp_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index to build and how to search it.

    Attributes:
        kind: ``flat`` (exact, the default), ``ivf`` (inverted lists over k-means cells; fast on large
            galleries, approximate) or ``hnsw`` (a navigable small-world graph; fast, approximate, no training).
        nlist: IVF cells; lowered automatically on small galleries (at least 39 points per cell).
        nprobe: IVF cells visited per query (recall vs speed).
        hnsw_m: HNSW neighbours per node (recall and memory vs speed).
        ef_construction: HNSW candidate-list size while building.
        ef_search: HNSW candidate-list size per query (recall vs speed).
    """

    kind: str = "flat"
    nlist: int = 1024
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise SearchError(f"index kind {self.kind!r} is not one of {', '.join(INDEX_KINDS)}")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise SearchError(f"{name} must be at least 1, got {getattr(self, name)}")


def create_faiss_index(embeddings: np.ndarray, spec: IndexSpec) -> tuple[faiss.Index, dict[str, Any]]:
    """A trained faiss index holding ``embeddings``, and the parameters it was actually built with."""
    embeddings = _as_float32(embeddings)
    count, dim = embeddings.shape
    params: dict[str, Any] = {"kind": spec.kind}
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "ivf":
        nlist = max(1, min(spec.nlist, count // MIN_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        params.update(nlist=nlist, nprobe=min(spec.nprobe, nlist))
    else:
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        params.update(hnsw_m=spec.hnsw_m, ef_construction=spec.ef_construction, ef_search=spec.ef_search)
    configure_search(index, params)
    index.add(embeddings)
    return index, params


def configure_search(index: faiss.Index, params: dict[str, Any]) -> None:
    """Applies the query-time parameters (IVF ``nprobe``, HNSW ``efSearch``) recorded in ``params``."""
    if params["kind"] == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif params["kind"] == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])


def _as_float32(embeddings: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2:
        raise SearchError(f"embeddings must be a [count, dim] array, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int
    position: int
    path: str
    label: str | None
    score: float
    id: int | None = None


@dataclass
class GalleryIndex:
    """Gallery embeddings in a faiss index, with the paths, labels and model identity needed to use them.

    Build one with :meth:`build`, grow it with :meth:`add`, write it with :meth:`save` and read it back
    with :meth:`load`. Searching with an embedder goes through :meth:`check_embedder` first.

    Attributes:
        faiss_index: the faiss index; row ``i`` is ``paths[i]``.
        embeddings: ``[count, dim]`` float32 embeddings, in the same order.
        paths: image paths relative to ``gallery_root`` (POSIX separators).
        labels: class label of each image, None where unknown.
        model: the model's identity: ``fingerprint``, ``embedding_dim``, ``source``, ``preprocessing``,
            ``model_config``.
        index_params: the faiss index's kind and effective parameters.
        gallery_root: absolute folder the paths are relative to.
        created: creation time (ISO 8601, UTC).
        folder: the folder it was loaded from or last saved to; None for an index only in memory.
        ids: a stable id of each image (kept when others are removed; new images get ids above all others).
    """

    backend = "faiss"

    faiss_index: faiss.Index
    embeddings: np.ndarray
    paths: list[str]
    labels: list[str | None]
    model: dict[str, Any]
    index_params: dict[str, Any]
    gallery_root: str
    created: str = field(default_factory=lambda: now_iso())
    folder: str | None = None
    ids: list[int] | None = None
    _positions: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ids = list(range(len(self.paths))) if self.ids is None else list(self.ids)
        if len(self.ids) != len(self.paths) or len(set(self.ids)) != len(self.ids):
            raise IndexLoadError(f"inconsistent index: {len(self.ids)} ids (unique or not) for {len(self.paths)} paths")
        self._positions = {path: i for i, path in enumerate(self.paths)}
        if len(self._positions) != len(self.paths):
            raise SearchError("an index cannot hold the same path twice")
        if not len(self.paths) == len(self.labels) == len(self.embeddings) == self.faiss_index.ntotal:
            raise IndexLoadError(
                f"inconsistent index: {len(self.paths)} paths, {len(self.labels)} labels, "
                f"{len(self.embeddings)} embeddings, {self.faiss_index.ntotal} vectors"
            )

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        paths: list[str],
        labels: list[str | None],
        embedder: Embedder,
        gallery_root: str | Path,
        spec: IndexSpec | None = None,
    ) -> GalleryIndex:
        """A new index over ``embeddings`` (computed by ``embedder`` from ``gallery_root / paths``)."""
        embeddings = _as_float32(embeddings)
        if embeddings.shape[1] != embedder.embedding_dim:
            raise SearchError(f"embeddings have {embeddings.shape[1]} dims, the model {embedder.embedding_dim}")
        if not len(embeddings):
            raise SearchError("cannot build an index of zero images")
        faiss_index, params = create_faiss_index(embeddings, spec or IndexSpec())
        return cls(
            faiss_index=faiss_index,
            embeddings=embeddings,
            paths=list(paths),
            labels=list(labels),
            model=model_identity(embedder),
            index_params=params,
            gallery_root=str(Path(gallery_root).expanduser().resolve()),
        )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embedding_dim(self) -> int:
        return int(self.model["embedding_dim"])

    def __contains__(self, path: str) -> bool:
        return path in self._positions

    def position_of(self, path: str) -> int:
        """Row of a gallery path; KeyError if it is not indexed."""
        return self._positions[path]

    def add(self, embeddings: np.ndarray, paths: list[str], labels: list[str | None]) -> None:
        """Appends new images; the stored embeddings of the old ones are kept as they are.

        IVF cells stay those trained on the first images: after the gallery has grown several-fold,
        :meth:`rebuild` retrains them from the stored embeddings.
        """
        embeddings = _as_float32(embeddings)
        if embeddings.shape[1] != self.embedding_dim:
            raise IndexMismatchError(f"new embeddings have {embeddings.shape[1]} dims, the index {self.embedding_dim}")
        duplicates = [p for p in paths if p in self._positions]
        if duplicates or len(set(paths)) != len(paths):
            raise SearchError(f"{len(duplicates)} paths are already indexed (e.g. {duplicates[:3]})")
        self.faiss_index.add(embeddings)
        start, first_id = len(self.paths), max(self.ids, default=-1) + 1
        self.ids.extend(range(first_id, first_id + len(paths)))
        self.embeddings = np.concatenate([self.embeddings, embeddings]) if len(self.embeddings) else embeddings
        self.paths.extend(paths)
        self.labels.extend(labels)
        self._positions.update({path: start + i for i, path in enumerate(paths)})

    def remove(self, paths: Sequence[str] = (), ids: Sequence[int] = ()) -> list[str]:
        """Removes images by gallery path and by id, without re-embedding; returns the paths removed.

        The faiss index keeps its trained state (IVF cells) and is refilled with the remaining embeddings.

        Raises:
            SearchError: a path or id the index does not hold (nothing is removed then).
        """
        from metricsearch.search.milvus_index import _rows_to_remove

        rows = _rows_to_remove(self, list(paths), list(ids))
        if not rows:
            return []
        if len(rows) == len(self):
            raise SearchError("removing every image would leave an empty index; build a new one instead")
        removed = [self.paths[r] for r in rows]
        keep = np.setdiff1d(np.arange(len(self)), rows)
        refilled = faiss.clone_index(self.faiss_index)
        refilled.reset()
        refilled.add(self.embeddings[keep])
        configure_search(refilled, self.index_params)
        self.faiss_index, self.embeddings = refilled, np.ascontiguousarray(self.embeddings[keep])
        self.paths = [self.paths[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.ids = [self.ids[i] for i in keep]
        self._positions = {path: i for i, path in enumerate(self.paths)}
        return removed

    def embedding_of(self, path: str) -> np.ndarray:
        """The stored embedding of a gallery image; KeyError if it is not indexed."""
        return self.embeddings[self.position_of(path)]

    def rebuild(self, spec: IndexSpec) -> None:
        """Replaces the faiss index by one of ``spec``'s kind over the stored embeddings (no re-embedding)."""
        self.faiss_index, self.index_params = create_faiss_index(self.embeddings, spec)

    def search(self, queries: np.ndarray, k: int = 10, where: SearchFilter | None = None) -> list[list[Hit]]:
        """The ``k`` most similar gallery images of each query embedding, best first (all of them if fewer).

        With ``where``, only images that pass the filter, found by an exact post-filter (:func:`filtered_search`).

        Raises:
            RequestError: ``k`` is below 1.
        """
        if int(k) < 1:
            raise RequestError(f"k must be at least 1, got {k}")
        queries = _as_float32(queries)
        if queries.shape[1] != self.embedding_dim:
            raise IndexMismatchError(
                f"query embeddings have {queries.shape[1]} dims but the index holds {self.embedding_dim}-d ones"
            )
        if where is not None:
            from metricsearch.search.backends import filtered_search

            allowed = np.fromiter(
                (where.matches(p, lab) for p, lab in zip(self.paths, self.labels, strict=True)), bool, len(self)
            )
            found = filtered_search(self.faiss_index, queries, int(k), allowed)
        else:
            scores, rows = self.faiss_index.search(queries, min(int(k), len(self)))
            # Approximate indexes return -1 when they find fewer than k neighbours.
            found = [
                [(int(r), float(s)) for r, s in zip(query_rows, query_scores, strict=True) if r >= 0]
                for query_scores, query_rows in zip(scores, rows, strict=True)
            ]
        return [
            [Hit(rank + 1, r, self.paths[r], self.labels[r], s, self.ids[r]) for rank, (r, s) in enumerate(kept)]
            for kept in found
        ]

    def shortlist(
        self, queries: np.ndarray, width: int, where: SearchFilter | None = None
    ) -> list[tuple[list[Hit], np.ndarray]]:
        """The ``width`` best hits of each query (as :meth:`search`) and their stored embeddings, in that order: what
        a re-ranking search (:mod:`~metricsearch.search.rerank`) re-ranks."""
        return [(hits, self.embeddings[[h.position for h in hits]]) for hits in self.search(queries, width, where)]

    def check_embedder(self, embedder: Embedder) -> None:
        """Refuses a model that would produce embeddings incomparable with the indexed ones.

        Raises:
            IndexMismatchError: another embedding size, or other weights / preprocessing (fingerprint). The message
                names both models and gives the command that rebuilds the index with the new one.
        """
        built_with = self.model["source"]
        where = f"index={self.folder}: " if self.folder else ""
        folder = Path(self.folder) if self.folder else Path("INDEX_DIR")
        where_vectors = {"backend": self.backend, "uri": getattr(self, "uri", None)}
        rebuild = rebuild_command(folder, {"gallery_root": self.gallery_root, **where_vectors}, source=embedder.source)
        if embedder.embedding_dim != self.embedding_dim:
            raise IndexMismatchError(
                f"{where}this index holds {self.embedding_dim}-d embeddings (built with {built_with['kind']} "
                f"{built_with['path']}) but {embedder.describe()} makes {embedder.embedding_dim}-d ones: "
                f"search it with the model that built it, or {rebuild} (with this model)"
            )
        if embedder.fingerprint != self.model["fingerprint"]:
            raise IndexMismatchError(
                f"{where}this index was built by another model: fingerprint {self.model['fingerprint'][:12]} "
                f"({built_with['kind']} {built_with['path']}), not {embedder.describe()}. Embeddings of different "
                "models are not comparable: search with the model that built the index (or its ONNX export), "
                f"or {rebuild} (with this model)"
            )

    def resolve(self, path: str) -> Path:
        """Absolute file of an indexed relative path."""
        return Path(self.gallery_root) / path

    def metadata(self, vectors_file: str, embeddings_file: str, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The JSON document that describes (and commits) a saved index.

        Args:
            vectors_file: name of the faiss file.
            embeddings_file: name of the embeddings file.
            files: each data file's name mapped to its ``bytes`` and ``sha256``, checked by :meth:`load`.
        """
        return {
            **common_metadata(self, "faiss"),
            "vectors_file": vectors_file,
            "embeddings_file": embeddings_file,
            "files": files,
            "paths": self.paths,
            "labels": self.labels,
            "ids": self.ids,
        }

    def save(self, folder: str | Path) -> Path:
        """Writes the index into ``folder`` atomically (see the module docstring); returns the folder."""
        folder = Path(folder).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        token = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
        vectors_file, embeddings_file = f"vectors-{token}.faiss", f"embeddings-{token}.npy"
        try:
            files = {
                vectors_file: write_data_file(
                    folder / vectors_file, lambda tmp: faiss.write_index(self.faiss_index, str(tmp))
                ),
                embeddings_file: write_data_file(folder / embeddings_file, lambda tmp: np.save(tmp, self.embeddings)),
            }
        except BaseException:
            # Nothing refers to these yet; leave the folder as it was.
            for name in (vectors_file, embeddings_file):
                (folder / name).unlink(missing_ok=True)
            raise
        atomic_write_text(
            folder / METADATA_NAME, json.dumps(self.metadata(vectors_file, embeddings_file, files), indent=1) + "\n"
        )
        # Only now are the previous data files unreferenced.
        for stale in [*folder.glob("vectors-*.faiss"), *folder.glob("embeddings-*.npy")]:
            if stale.name not in files:
                stale.unlink(missing_ok=True)
        remove_orphaned_temp_files(folder, is_index_file_name)
        self.folder = str(folder)
        log.info("Saved an index of %d images to %s", len(self), folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, gallery_root: str | Path | None = None) -> GalleryIndex:
        """Reads an index saved by :meth:`save`, after checking its data files against ``metadata.json``.

        Args:
            folder: the index folder.
            gallery_root: where the gallery images are now, if they moved since the index was built.

        Raises:
            IndexLoadError: no finished index there, another format, or data files that are missing, truncated,
                corrupted or disagree with the metadata; the message names the file and how to rebuild.
        """
        folder = Path(folder).expanduser().resolve()
        meta = read_metadata(folder)
        if meta.get("backend", "faiss") != "faiss":
            raise IndexLoadError(f"index={folder} is a {meta['backend']} index: open it with load_gallery_index")
        vectors_path, embeddings_path = folder / meta["vectors_file"], folder / meta["embeddings_file"]
        # Indexes saved before sizes and checksums were recorded have no "files" entry: nothing to check them with.
        for path in (vectors_path, embeddings_path):
            check_data_file(path, meta.get("files", {}).get(path.name), folder, meta)
        try:
            faiss_index = faiss.read_index(str(vectors_path))
        except RuntimeError as err:
            raise IndexLoadError(damaged_message(folder, meta, vectors_path, f"faiss cannot read it: {err}")) from err
        try:
            configure_search(faiss_index, meta["index"])
        except (RuntimeError, AttributeError) as err:
            reason = f"it is not the {meta['index']['kind']} index {METADATA_NAME} says it is"
            raise IndexLoadError(damaged_message(folder, meta, vectors_path, reason)) from err
        try:
            embeddings = np.load(embeddings_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise IndexLoadError(
                damaged_message(folder, meta, embeddings_path, f"numpy cannot read it: {err}")
            ) from err
        count, dim = meta["count"], meta["embedding_dim"]
        if (
            embeddings.shape != (count, dim)
            or embeddings.dtype.kind != "f"
            or faiss_index.d != dim
            or faiss_index.ntotal != count
        ):
            raise IndexLoadError(
                f"index={folder}: metadata and data files disagree ({METADATA_NAME}: {count} x {dim}, embeddings "
                f"{embeddings.shape} {embeddings.dtype}, faiss {faiss_index.ntotal} x {faiss_index.d}); "
                f"{rebuild_command(folder, meta)}"
            )
        return cls(
            faiss_index=faiss_index,
            embeddings=embeddings,
            paths=list(meta["paths"]),
            labels=list(meta["labels"]),
            model=meta["model"],
            index_params=meta["index"],
            gallery_root=str(Path(gallery_root).expanduser().resolve()) if gallery_root else meta["gallery_root"],
            created=meta["created"],
            folder=str(folder),
            ids=meta.get("ids"),
        )


def open_index(
    folder: str | Path,
    gallery: str | Path | None = None,
    backend: str | None = None,
    uri: str | Path | None = None,
    **choice: Unpack[ModelChoice],
) -> tuple[GalleryIndex, Embedder]:
    """An index and a model checked to be the one that built it.

    Args:
        folder: the index folder.
        gallery: where the gallery images are now, if they moved.
        backend: the backend the folder must hold (``index.backend=``; None: whichever it holds).
        uri: a Milvus index's collection, where it is now (``index.uri=``; see
            :func:`~metricsearch.search.backends.load_gallery_index`).
        choice: a model to embed queries with (``ckpt=``, ``model=`` or ``backbone=``; see
            :mod:`~metricsearch.inference.model_choice`) instead of the one the index records; it must have the same
            weights (a checkpoint and its ONNX export are interchangeable).

    Raises:
        IndexMismatchError: the model given is not the one that built the index.
    """
    from metricsearch.search.backends import load_gallery_index

    index = load_gallery_index(folder, gallery_root=gallery, backend=backend, uri=uri)
    choice = given_choice(choice)
    embedder = load_embedder(**choice) if choice else recorded_embedder(index)
    index.check_embedder(embedder)
    return index, embedder


def recorded_embedder(index: GalleryIndex) -> Embedder:
    """The model ``index`` records it was built with; an error names the index, since the index named the model."""
    try:
        return load_embedder_from_source(index.model["source"])
    except ModelLoadError as err:
        raise ModelLoadError(f"index={index.folder}: {err}") from err


def model_identity(embedder: Embedder) -> dict[str, Any]:
    """What an index records about the model that built it."""
    return {
        "fingerprint": embedder.fingerprint,
        "embedding_dim": embedder.embedding_dim,
        "source": embedder.source,
        "preprocessing": embedder.preprocessing,
        "model_config": embedder.model_config,
    }
