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
import re
import secrets
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import faiss
import numpy as np

from metricsearch.data.io import IMAGE_EXTENSIONS
from metricsearch.inference.errors import ModelLoadError
from metricsearch.inference.model_choice import CHOICE_OF_SOURCE, ModelChoice, given_choice
from metricsearch.inference.model_loading import Embedder, file_sha256, load_embedder, load_embedder_from_source
from metricsearch.inference.predict_embeddings import SHARDS_NAME
from metricsearch.search.errors import IndexLoadError, IndexMismatchError, RequestError, SearchError
from metricsearch.search.filters import SearchFilter
from metricsearch.utils.atomic_io import atomic_path, atomic_write_text, remove_orphaned_temp_files, temp_file_target
from metricsearch.utils.messages import shorten
from metricsearch.utils.paths import relative_name_problem

log = logging.getLogger(__name__)

METADATA_NAME = "metadata.json"
FORMAT_NAME = "metricsearch-index"
FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "ivf", "hnsw")
# faiss warns below ~39 training points per IVF list; fewer lists than that would train badly.
MIN_POINTS_PER_LIST = 39
# A metadata.json larger than this is refused before it is read (about 10 million gallery paths).
MAX_METADATA_BYTES = 1 << 30
# Longest file-system path a metadata string may name (Linux's PATH_MAX).
MAX_PATH_CHARS = 4096
DATA_FILE_NAME = re.compile(r"(vectors-[A-Za-z0-9-]+\.faiss|embeddings-[A-Za-z0-9-]+\.npy)")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Query-time and build parameters each index kind records, all positive integers.
INDEX_PARAMS = {"flat": (), "ivf": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_construction", "ef_search")}


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
    created: str = field(default_factory=lambda: _now())
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
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "backend": "faiss",
            "created": self.created,
            "updated": _now(),
            "count": len(self),
            "embedding_dim": self.embedding_dim,
            "index": self.index_params,
            "model": self.model,
            "gallery_root": self.gallery_root,
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
                vectors_file: _write_data_file(
                    folder / vectors_file, lambda tmp: faiss.write_index(self.faiss_index, str(tmp))
                ),
                embeddings_file: _write_data_file(folder / embeddings_file, lambda tmp: np.save(tmp, self.embeddings)),
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
        remove_orphaned_temp_files(folder, _is_index_file_name)
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
            _check_data_file(path, meta.get("files", {}).get(path.name), folder, meta)
        try:
            faiss_index = faiss.read_index(str(vectors_path))
        except RuntimeError as err:
            raise IndexLoadError(_damaged_message(folder, meta, vectors_path, f"faiss cannot read it: {err}")) from err
        try:
            configure_search(faiss_index, meta["index"])
        except (RuntimeError, AttributeError) as err:
            reason = f"it is not the {meta['index']['kind']} index {METADATA_NAME} says it is"
            raise IndexLoadError(_damaged_message(folder, meta, vectors_path, reason)) from err
        try:
            embeddings = np.load(embeddings_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise IndexLoadError(
                _damaged_message(folder, meta, embeddings_path, f"numpy cannot read it: {err}")
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


def read_metadata(folder: Path) -> dict[str, Any]:
    """The ``metadata.json`` of the index in ``folder``, its structure checked before anything in it is used.

    The structure is the one :meth:`GalleryIndex.metadata` writes (see :func:`metadata_problem`). An index folder
    is data someone may hand over: every key is checked for presence, type and range, the data files it names
    must be plain names inside the folder, and the gallery paths relative ones inside the root.

    Raises:
        IndexLoadError: no finished index, another format, or a damaged document; one line that says what is
            wrong and how to rebuild the index.
    """
    meta_path = folder / METADATA_NAME
    if not meta_path.is_file():
        raise IndexLoadError(_no_index_message(folder))
    size = meta_path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise IndexLoadError(
            _damaged_metadata(folder, {}, f"it is {size:,} bytes, over the limit of {MAX_METADATA_BYTES:,}")
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        reason = "it nests too deeply" if isinstance(err, RecursionError) else str(err)
        raise IndexLoadError(
            f"index={folder}: {METADATA_NAME} is not valid JSON ({reason}); rebuild the index with "
            "scripts/build_index.py (overwrite=true)"
        ) from err
    if not isinstance(meta, dict):
        raise IndexLoadError(_damaged_metadata(folder, {}, f"it holds {shorten(meta)}, not an object"))
    if meta.get("format") != FORMAT_NAME or type(meta.get("version")) is not int or meta["version"] != FORMAT_VERSION:
        raise IndexLoadError(
            f"index={folder} is not a MetricSearch index of version {FORMAT_VERSION} "
            f"(format {shorten(meta.get('format'))}, version {shorten(meta.get('version'))}); rebuild it"
        )
    problem = metadata_problem(meta)
    if problem:
        raise IndexLoadError(_damaged_metadata(folder, meta, problem))
    return meta


def metadata_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the structure of an index's metadata (see :meth:`GalleryIndex.metadata`); None if nothing.

    Checks every key the index uses: types, ranges, that the counts agree, that the data files are plain names
    of this folder and that every gallery path is a unique relative path that stays inside the gallery root.
    """
    try:
        _check_metadata(meta)
    except _Malformed as err:
        return str(err)
    return None


class _Malformed(ValueError):
    """One structural problem of a metadata document."""


def _field(document: Any, key: str, kinds: type | tuple[type, ...], where: str = "") -> Any:
    if not isinstance(document, dict) or key not in document:
        raise _Malformed(f"the key {where}{key} is missing")
    value = document[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    # NOTE: bool is a subclass of int; JSON's true/false are never a valid count or size here.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise _Malformed(f"{where}{key} should be {expected}, not {shorten(value)}")
    return value


def _positive(document: Any, key: str, where: str = "", minimum: int = 1) -> int:
    value = _field(document, key, int, where)
    if value < minimum:
        raise _Malformed(f"{where}{key} should be at least {minimum}, not {shorten(value)}")
    return value


def _path_text(document: Any, key: str, where: str = "") -> str:
    value = _field(document, key, str, where)
    if not value or len(value) > MAX_PATH_CHARS or any(ord(c) < 32 for c in value):
        raise _Malformed(f"{where}{key} should be a file-system path, not {shorten(value)}")
    return value


def _check_metadata(meta: dict[str, Any]) -> None:
    _field(meta, "created", str)
    count = _positive(meta, "count", minimum=0)
    dim = _positive(meta, "embedding_dim")
    params = _field(meta, "index", dict)
    kind = _field(params, "kind", str, "index.")
    if kind not in INDEX_KINDS:
        raise _Malformed(f"index.kind should be one of {', '.join(INDEX_KINDS)}, not {shorten(kind)}")
    for name in INDEX_PARAMS[kind]:
        _positive(params, name, "index.")
    model = _field(meta, "model", dict)
    fingerprint = _field(model, "fingerprint", str, "model.")
    if not SHA256_HEX.fullmatch(fingerprint):
        raise _Malformed(f"model.fingerprint should be 64 hexadecimal digits, not {shorten(fingerprint)}")
    if _positive(model, "embedding_dim", "model.") != dim:
        raise _Malformed(f"model.embedding_dim {model['embedding_dim']} differs from embedding_dim {dim}")
    source = _field(model, "source", dict, "model.")
    source_kind = _field(source, "kind", str, "model.source.")
    if source_kind not in CHOICE_OF_SOURCE:
        kinds = ", ".join(CHOICE_OF_SOURCE)
        raise _Malformed(f"model.source.kind should be one of {kinds}, not {shorten(source_kind)}")
    _path_text(source, "path", "model.source.")
    _field(model, "preprocessing", dict, "model.")
    _field(model, "model_config", dict, "model.")
    gallery_root = _path_text(meta, "gallery_root")
    if not Path(gallery_root).is_absolute() or Path(gallery_root) == Path(gallery_root).parent:
        raise _Malformed(
            f"gallery_root should be the absolute path of the gallery folder (not the file system's root), not "
            f"{shorten(gallery_root)}"
        )
    backend = _field(meta, "backend", str) if "backend" in meta else "faiss"
    if backend not in ("faiss", "milvus"):
        raise _Malformed(f"backend should be faiss or milvus, not {shorten(backend)}")
    if backend != "faiss":
        # Another backend's data lives outside the folder; its module checks its own keys.
        return
    names = [_field(meta, key, str) for key in ("vectors_file", "embeddings_file")]
    for key, name in zip(("vectors_file", "embeddings_file"), names, strict=True):
        if not DATA_FILE_NAME.fullmatch(name) or not name.startswith(key.split("_")[0]):
            raise _Malformed(f"{key} should name a data file of the index folder, not {shorten(name)}")
    if "files" in meta:
        files = _field(meta, "files", dict)
        for name in names:
            record = _field(files, name, dict, "files.")
            _positive(record, "bytes", f"files.{name}.", minimum=0)
            if not SHA256_HEX.fullmatch(_field(record, "sha256", str, f"files.{name}.")):
                raise _Malformed(f"files.{name}.sha256 should be 64 hexadecimal digits")
    paths, labels = _field(meta, "paths", list), _field(meta, "labels", list)
    if not len(paths) == len(labels) == count:
        raise _Malformed(f"count is {count} but there are {len(paths)} paths and {len(labels)} labels")
    for position, path in enumerate(paths):
        if not isinstance(path, str) or not is_gallery_relative(path):
            raise _Malformed(
                f"paths[{position}] should be a relative path inside the gallery root, not {shorten(path)}"
            )
        if not is_gallery_image_name(path):
            raise _Malformed(
                f"paths[{position}] should name an image file ({', '.join(IMAGE_EXTENSIONS)}) that is not hidden, "
                f"not {shorten(path)}"
            )
    if len(set(paths)) != len(paths):
        raise _Malformed("a gallery path is listed twice")
    if "ids" in meta:
        ids = _field(meta, "ids", list)
        if len(ids) != count or any(type(i) is not int or i < 0 for i in ids) or len(set(ids)) != count:
            raise _Malformed(f"ids should be {count} distinct non-negative integers")
    for position, label in enumerate(labels):
        if label is not None and not isinstance(label, str):
            raise _Malformed(f"labels[{position}] should be a str or null, not {shorten(label)}")


def is_gallery_relative(path: str) -> bool:
    """Whether ``path`` is a POSIX path relative to the gallery root that cannot climb out of it (the rule of
    :mod:`metricsearch.utils.paths`, written one way only: no backslash, no empty or ``.`` part)."""
    return (
        len(path) <= MAX_PATH_CHARS
        and relative_name_problem(path) is None
        and "\\" not in path
        and all(part not in ("", ".", "..") for part in path.split("/"))
    )


def is_gallery_image_name(path: str) -> bool:
    """Whether a gallery path names what :func:`~metricsearch.search.gallery.list_gallery_images` indexes: a file
    with an image extension, in no hidden folder and not hidden itself."""
    parts = path.split("/")
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in parts)


def _damaged_metadata(folder: Path, meta: dict[str, Any], problem: str) -> str:
    return (
        f"index={folder}: {METADATA_NAME} is damaged or was not written by MetricSearch ({problem}), so the index "
        f"is not used; {rebuild_command(folder, meta)}"
    )


def _write_data_file(path: Path, write: Callable[[Path], None]) -> dict[str, Any]:
    """Writes one data file atomically with ``write(tmp)``; returns the size and checksum that metadata records."""
    with atomic_path(path) as tmp:
        write(tmp)
        # Hashed from the temporary file: what gets renamed into place is exactly what was measured.
        record = {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
    return record


def _check_data_file(path: Path, recorded: dict[str, Any] | None, folder: Path, meta: dict[str, Any]) -> None:
    """Refuses a data file that is missing or differs from the size and checksum recorded when it was saved."""
    if not path.is_file():
        raise IndexLoadError(_damaged_message(folder, meta, path, f"it is missing, although {METADATA_NAME} names it"))
    if recorded is None:
        return
    size = path.stat().st_size
    if size != recorded["bytes"]:
        state = "truncated" if size < recorded["bytes"] else "longer than written"
        reason = f"it is {size:,} bytes, but {recorded['bytes']:,} were written ({state})"
        raise IndexLoadError(_damaged_message(folder, meta, path, reason))
    if file_sha256(path) != recorded["sha256"]:
        reason = "its content differs from what was written (SHA-256 mismatch: corrupted or replaced)"
        raise IndexLoadError(_damaged_message(folder, meta, path, reason))


def _damaged_message(folder: Path, meta: dict[str, Any], path: Path, reason: str) -> str:
    return f"index={folder}: the data file {path.name} cannot be used: {reason}; {rebuild_command(folder, meta)}"


def rebuild_command(folder: Path, meta: dict[str, Any], source: dict[str, Any] | None = None) -> str:
    """The sentence that tells how to rebuild the index in ``folder`` (with ``source``, by default its own model).

    ``meta`` may be damaged: only values of the right type and a sane length are used, placeholders otherwise.
    """

    def text(document: Any, key: str, placeholder: str) -> str:
        value = document.get(key) if isinstance(document, dict) else None
        ok = isinstance(value, str) and 0 < len(value) <= MAX_PATH_CHARS and not any(ord(c) < 32 for c in value)
        return value if ok else placeholder

    if source is None:
        model = meta.get("model") if isinstance(meta, dict) else None
        source = model.get("source") if isinstance(model, dict) else None
    option = CHOICE_OF_SOURCE.get(text(source, "kind", "checkpoint"), "ckpt")
    gallery = text(meta, "gallery_root", "GALLERY")
    args = [f"{option}={text(source, 'path', 'PATH')}", f"gallery={gallery}", f"out={folder}", "overwrite=true"]
    if isinstance(meta, dict) and meta.get("backend") == "milvus":
        args += ["backend=milvus", f"uri={text(meta, 'uri', 'URI')}"]
    return f"rebuild the index: python scripts/build_index.py {shlex.join(args)}"


def _no_index_message(folder: Path) -> str:
    """Why ``folder`` holds no index: it does not exist, holds something else, or holds an unfinished build.

    What a build leaves in the folder besides the index: the embedding shards (see
    :func:`~metricsearch.inference.predict_embeddings.embed_files`) and the temporary files of the atomic writes of the
    data files and the metadata.
    """
    if not folder.is_dir():
        state = "nothing is there" if not folder.exists() else "it is a file"
        return f"index={folder} is not a folder ({state}); build an index with scripts/build_index.py"
    leftovers = sorted(
        p.name
        for p in folder.iterdir()
        if p.name == SHARDS_NAME or _is_index_temp_file(p) or _is_data_file_name(p.name)
    )
    if leftovers:
        return (
            f"index={folder} has no {METADATA_NAME} (no finished index): a build was interrupted and left "
            f"{', '.join(leftovers[:3])}; run scripts/build_index.py with out={folder} again"
        )
    return f"index={folder} has no {METADATA_NAME} (no finished index); build one with scripts/build_index.py"


def _is_data_file_name(name: str) -> bool:
    return (name.startswith("vectors-") and name.endswith(".faiss")) or (
        name.startswith("embeddings-") and name.endswith(".npy")
    )


def _is_index_file_name(name: str) -> bool:
    """Whether ``name`` is one of the files a save writes: the metadata or a data file."""
    return name == METADATA_NAME or _is_data_file_name(name)


def _is_index_temp_file(path: Path) -> bool:
    """Whether ``path`` is a temporary file of an atomic write of this index's data files or metadata."""
    target = temp_file_target(path)
    return target is not None and _is_index_file_name(target[0])


def open_index(
    folder: str | Path, gallery: str | Path | None = None, **choice: Unpack[ModelChoice]
) -> tuple[GalleryIndex, Embedder]:
    """An index and a model checked to be the one that built it.

    Args:
        folder: the index folder.
        gallery: where the gallery images are now, if they moved.
        choice: a model to embed queries with (``ckpt=``, ``model=`` or ``backbone=``; see
            :mod:`~metricsearch.inference.model_choice`) instead of the one the index records; it must have the same
            weights (a checkpoint and its ONNX export are interchangeable).

    Raises:
        IndexMismatchError: the model given is not the one that built the index.
    """
    from metricsearch.search.backends import load_gallery_index

    index = load_gallery_index(folder, gallery_root=gallery)
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


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
