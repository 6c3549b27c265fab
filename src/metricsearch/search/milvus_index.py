"""A gallery index whose vectors, paths and labels live in a Milvus collection.

The index folder stays the one description of an index: its ``metadata.json`` records the model's identity, the
gallery root, the index kind and ``backend: milvus`` with the Milvus ``uri`` and ``collection``, so the model check
(:meth:`~metricsearch.search.index.GalleryIndex.check_embedder`) and every command work as they do for the faiss
backend. The ``uri`` is either a file path, opened with Milvus Lite (embedded in this process, by default
``gallery.db`` inside the index folder), or the URL of a Milvus server (``http://host:19530``): the same code
runs on both.

Each row of the collection holds an ``id`` (INT64 primary key, stable across additions and removals), the
embedding (FLOAT_VECTOR), the gallery ``path``, the ``label`` (null when unknown) and ``folders`` (every folder
the path lies under, for the folder filter).

Changes are atomic through the metadata, as for the faiss index. ``metadata.json`` records ``next_id``: rows are
visible only below it (every search and listing carries ``id < next_id``). An addition inserts rows from
``next_id`` on, then commits them by writing the metadata with the new ``next_id``; a writer killed before that
commit leaves rows nobody sees, deleted by the next writer. A rebuild fills a new collection and commits by naming
it in the metadata; the collection it replaces is dropped afterwards. A removal is one ``delete`` call.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metricsearch.inference.model_loading import Embedder
from metricsearch.search.errors import IndexLoadError, IndexMismatchError, RequestError, SearchError
from metricsearch.search.filters import SearchFilter, folders_of, milvus_expression
from metricsearch.search.index import GalleryIndex, Hit, IndexSpec, model_identity
from metricsearch.search.index_metadata import (
    METADATA_NAME,
    common_metadata,
    is_gallery_relative,
    now_iso,
    read_metadata,
)
from metricsearch.utils.atomic_io import atomic_write_text
from metricsearch.utils.messages import shorten

log = logging.getLogger(__name__)

BACKENDS = ("faiss", "milvus")
DEFAULT_LITE_FILE = "gallery.db"
# Milvus index types of our index kinds; FLAT with inner product is exact search.
MILVUS_INDEX_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
# Rows per insert call (a gRPC message stays well under Milvus's 64 MB limit at 2,048 dims).
INSERT_BATCH = 2000
# Rows per page when the paths and labels are read back.
QUERY_BATCH = 4000
MAX_FOLDER_DEPTH = 128
MAX_LABEL_CHARS = 1024
COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` names a Milvus server (a URL) rather than a Milvus Lite file."""
    return uri.startswith(SERVER_SCHEMES)


def resolve_uri(uri: str | Path | None, folder: Path) -> str:
    """The Milvus uri of an index in ``folder``: a server URL as it is, a Lite file as an absolute path."""
    if uri is None or str(uri) == "":
        return str(folder / DEFAULT_LITE_FILE)
    uri = str(uri)
    if is_server_uri(uri):
        return uri
    if not uri.endswith(".db"):
        raise SearchError(
            f"index.uri={shorten(uri)} should be a Milvus Lite file ending in .db or a server URL (http://...)"
        )
    return str(Path(uri).expanduser().resolve())


def connect(uri: str) -> Any:
    """A ``MilvusClient`` of ``uri``, one per uri and process (Milvus Lite opens its file once)."""
    with _clients_lock:
        if uri not in _clients:
            try:
                from pymilvus import MilvusClient
            except ImportError as err:  # pragma: no cover - pinned in requirements.txt
                raise SearchError(
                    "index.backend=milvus needs pymilvus and milvus-lite: pip install -r requirements.txt"
                ) from err
            try:
                _clients[uri] = MilvusClient(uri)
            except Exception as err:  # noqa: BLE001 - pymilvus raises many types for an unreachable server
                busy = (
                    ""
                    if is_server_uri(uri) or not (Path(uri) / "LOCK").exists()
                    else (
                        " (Milvus Lite lets one process at a time open its file: is a server or another command "
                        "using this index? stop it first, or use a Milvus server index.uri=http://HOST:19530)"
                    )
                )
                raise IndexLoadError(f"cannot open Milvus at {uri}: {one_line(err)}{busy}") from err
        return _clients[uri]


def release(uri: str) -> None:
    """Closes this process's client of ``uri``; a Milvus Lite file is then free for another process to open."""
    with _clients_lock:
        client = _clients.pop(uri, None)
    if client is not None:
        client.close()
    if not is_server_uri(uri):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def one_line(err: BaseException) -> str:
    """A Milvus error as a short line (its messages hold the whole request)."""
    text = getattr(err, "message", None) or str(err)
    return shorten(" ".join(str(text).split()), 300)


def release_all() -> None:
    """Closes every Milvus client this process opened (Milvus Lite files are then free for others)."""
    with _clients_lock:
        uris = list(_clients)
    for uri in uris:
        release(uri)


def default_collection_prefix(folder: Path) -> str:
    """The collection-name prefix of the index in ``folder``: unique per folder, so indexes may share a server."""
    return "metricsearch_" + hashlib.sha256(str(folder).encode()).hexdigest()[:12]


@dataclass
class MilvusGalleryIndex:
    """Gallery embeddings in a Milvus collection, with the paths, labels and model identity needed to use them.

    Build one with :func:`build_milvus_index`, open one with :meth:`load`; :meth:`add` and :meth:`remove` change it
    in place (committed to ``metadata.json`` at once). The public surface is the faiss
    :class:`~metricsearch.search.index.GalleryIndex`'s, so the commands and the server use either.

    Attributes:
        client: the ``MilvusClient``.
        uri: the Milvus Lite file or server URL.
        collection: the collection's name.
        ids: the stable id of each visible row, ascending; ``paths[i]`` and ``labels[i]`` belong to ``ids[i]``.
        paths: image paths relative to ``gallery_root``.
        labels: class label of each image, None where unknown.
        model: the model's identity (as the faiss index records it).
        index_params: the index kind and its parameters.
        gallery_root: absolute folder the paths are relative to.
        next_id: rows with this id and above are not committed (see the module docstring).
        created: creation time (ISO 8601, UTC).
        folder: the index folder.
    """

    client: Any
    uri: str
    collection: str
    ids: list[int]
    paths: list[str]
    labels: list[str | None]
    model: dict[str, Any]
    index_params: dict[str, Any]
    gallery_root: str
    next_id: int
    created: str
    folder: str
    _positions: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    backend = "milvus"

    def __post_init__(self) -> None:
        self._positions = {path: i for i, path in enumerate(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: str) -> bool:
        return path in self._positions

    @property
    def embedding_dim(self) -> int:
        return int(self.model["embedding_dim"])

    def position_of(self, path: str) -> int:
        """Row of a gallery path in :attr:`paths`; KeyError if it is not indexed."""
        return self._positions[path]

    def resolve(self, path: str) -> Path:
        """Absolute file of an indexed relative path."""
        return Path(self.gallery_root) / path

    def check_embedder(self, embedder: Embedder) -> None:
        """Refuses a model whose embeddings are incomparable with the indexed ones (the faiss index's rule)."""
        GalleryIndex.check_embedder(self, embedder)  # type: ignore[arg-type]

    # --- reading ---

    @classmethod
    def load(
        cls, folder: str | Path, gallery_root: str | Path | None = None, uri: str | Path | None = None
    ) -> MilvusGalleryIndex:
        """Opens the index described by ``folder/metadata.json`` and reads its paths and labels.

        Args:
            folder: the index folder.
            gallery_root: where the gallery images are now, if they moved since the index was built.
            uri: where the collection is now (``index.uri=``: a Lite file moved, a server on another host), instead
                of the uri the metadata records; a change committed later (add, remove) records this one.

        Raises:
            IndexLoadError: no finished index, damaged metadata, or a collection that is missing or is not the
                one the metadata describes.
        """
        folder = Path(folder).expanduser().resolve()
        meta = read_milvus_metadata(folder)
        uri = resolve_uri(uri, folder) if uri else meta["uri"]
        if not is_server_uri(uri) and not Path(uri).exists():
            raise IndexLoadError(
                f"index={folder}: its Milvus Lite data {uri} is missing; if it moved, give index.uri=ITS_PATH, "
                f"otherwise rebuild the index with scripts/build_index.py index.backend=milvus out={folder} "
                "overwrite=true"
            )
        client = connect(uri)
        collection = meta["collection"]
        try:
            if not client.has_collection(collection):
                raise IndexLoadError(
                    f"index={folder}: the Milvus collection {collection} at {uri} does not exist (dropped, or "
                    "another uri?); rebuild the index with scripts/build_index.py index.backend=milvus "
                    f"out={folder} overwrite=true"
                )
            client.load_collection(collection)
            ids, paths, labels = _read_rows(client, collection, meta["next_id"])
        except IndexLoadError:
            raise
        except Exception as err:  # noqa: BLE001 - any Milvus failure is one line
            raise IndexLoadError(f"index={folder}: Milvus at {uri} cannot be read: {one_line(err)}") from err
        root = str(Path(gallery_root).expanduser().resolve()) if gallery_root else meta["gallery_root"]
        return cls(
            client=client,
            uri=uri,
            collection=collection,
            ids=ids,
            paths=paths,
            labels=labels,
            model=meta["model"],
            index_params=meta["index"],
            gallery_root=root,
            next_id=meta["next_id"],
            created=meta["created"],
            folder=str(folder),
        )

    def embedding_of(self, path: str) -> np.ndarray:
        """The stored embedding of a gallery image; KeyError if it is not indexed."""
        row_id = self.ids[self.position_of(path)]
        rows = self.client.query(self.collection, filter=f"id == {row_id}", output_fields=["vector"])
        if not rows:
            raise KeyError(path)
        return np.asarray(rows[0]["vector"], dtype=np.float32)

    def search(self, queries: np.ndarray, k: int = 10, where: SearchFilter | None = None) -> list[list[Hit]]:
        """The ``k`` most similar gallery images of each query embedding, best first; ``where`` filters them."""
        return [hits for hits, _ in self._search(queries, k, where, with_vectors=False)]

    def shortlist(
        self, queries: np.ndarray, width: int, where: SearchFilter | None = None
    ) -> list[tuple[list[Hit], np.ndarray]]:
        """The ``width`` best hits of each query and their stored vectors, returned by the same Milvus search."""
        return self._search(queries, width, where, with_vectors=True)

    def _search(
        self, queries: np.ndarray, k: int, where: SearchFilter | None, with_vectors: bool
    ) -> list[tuple[list[Hit], np.ndarray]]:
        if int(k) < 1:
            raise RequestError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.embedding_dim:
            raise IndexMismatchError(
                f"query embeddings have shape {queries.shape} but the index holds {self.embedding_dim}-d ones"
            )
        none = np.zeros((0, self.embedding_dim), dtype=np.float32)
        if not len(self):
            return [([], none) for _ in queries]
        expression = f"id < {self.next_id}"
        if where is not None:
            expression += f" and {milvus_expression(where)}"
        answers = self.client.search(
            self.collection,
            data=queries.tolist(),
            limit=min(int(k), len(self)),
            filter=expression,
            output_fields=["path", "label", "vector"] if with_vectors else ["path", "label"],
            search_params={"metric_type": "IP", "params": _search_params(self.index_params)},
        )
        results = []
        for answer in answers:
            hits = []
            for rank, found in enumerate(answer):
                entity = found["entity"]
                position = self._positions.get(entity["path"], -1)
                hits.append(
                    Hit(rank + 1, position, entity["path"], entity.get("label"), float(found["distance"]), found["id"])
                )
            vectors = (
                np.asarray([found["entity"]["vector"] for found in answer], dtype=np.float32).reshape(
                    -1, self.embedding_dim
                )
                if with_vectors
                else none
            )
            results.append((hits, vectors))
        return results

    # --- changing ---

    def add(self, embeddings: np.ndarray, paths: list[str], labels: list[str | None]) -> None:
        """Inserts new images and commits them (all or none become visible, see the module docstring)."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise IndexMismatchError(f"new embeddings have shape {embeddings.shape}, the index {self.embedding_dim}-d")
        duplicates = [p for p in paths if p in self._positions]
        if duplicates or len(set(paths)) != len(paths):
            raise SearchError(f"{len(duplicates)} paths are already indexed (e.g. {duplicates[:3]})")
        _check_rows(paths, labels)
        self._purge_uncommitted()
        ids = list(range(self.next_id, self.next_id + len(paths)))
        _insert(self.client, self.collection, ids, embeddings, paths, labels)
        self.next_id += len(paths)
        self._commit()
        start = len(self.paths)
        self.ids.extend(ids)
        self.paths.extend(paths)
        self.labels.extend(labels)
        self._positions.update({path: start + i for i, path in enumerate(paths)})

    def remove(self, paths: list[str] = (), ids: list[int] = ()) -> list[str]:
        """Deletes images by gallery path and by id; returns the paths removed.

        Raises:
            SearchError: a path or id the index does not hold (nothing is removed then).
        """
        rows = _rows_to_remove(self, paths, ids)
        if not rows:
            return []
        doomed = [self.ids[r] for r in rows]
        self.client.delete(self.collection, filter=f"id in {doomed}")
        removed = [self.paths[r] for r in rows]
        keep = sorted(set(range(len(self.paths))) - set(rows))
        self.ids = [self.ids[i] for i in keep]
        self.paths = [self.paths[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.__post_init__()
        self._commit()
        return removed

    def _purge_uncommitted(self) -> None:
        """Deletes the rows of a writer killed before its commit (never visible; see the module docstring)."""
        leftovers = self.client.query(self.collection, filter=f"id >= {self.next_id}", output_fields=["count(*)"])
        if leftovers and leftovers[0]["count(*)"]:
            log.info("Deleting %d uncommitted rows of an interrupted addition", leftovers[0]["count(*)"])
            self.client.delete(self.collection, filter=f"id >= {self.next_id}")

    def _commit(self) -> None:
        _flush(self.client, self.collection)
        write_milvus_metadata(Path(self.folder), self)

    def metadata(self) -> dict[str, Any]:
        """The JSON document that describes (and commits) the index."""
        return {
            **common_metadata(self, "milvus"),
            "uri": self.uri,
            "collection": self.collection,
            "next_id": self.next_id,
        }


def _rows_to_remove(index: Any, paths: list[str], ids: list[int]) -> list[int]:
    """Rows of ``index`` named by path or id, sorted; an unknown one is an error that names it."""
    unknown = [p for p in paths if p not in index]
    by_id = {row_id: row for row, row_id in enumerate(index.ids)}
    unknown += [str(i) for i in ids if i not in by_id]
    if unknown:
        raise SearchError(f"the index holds no image {shorten(unknown[0])} ({len(unknown)} unknown paths or ids)")
    return sorted({index.position_of(p) for p in paths} | {by_id[i] for i in ids})


def build_milvus_index(
    embeddings: np.ndarray,
    paths: list[str],
    labels: list[str | None],
    embedder: Embedder,
    gallery_root: str | Path,
    folder: str | Path,
    spec: IndexSpec | None = None,
    uri: str | Path | None = None,
    collection_prefix: str | None = None,
) -> MilvusGalleryIndex:
    """A new Milvus index over ``embeddings``, committed to ``folder/metadata.json``.

    The rows go into a new collection, named in the metadata only once they are all in: an index already in
    ``folder`` stays whole until then, and its collection is dropped afterwards.
    """
    folder = Path(folder).expanduser().resolve()
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != embedder.embedding_dim:
        raise SearchError(f"embeddings have shape {embeddings.shape}, the model makes {embedder.embedding_dim}-d ones")
    if not len(embeddings):
        raise SearchError("cannot build an index of zero images")
    if len(set(paths)) != len(paths):
        raise SearchError("an index cannot hold the same path twice")
    _check_rows(paths, labels)
    spec = spec or IndexSpec()
    folder.mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(uri, folder)
    if not is_server_uri(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    prefix = collection_prefix or default_collection_prefix(folder)
    if not COLLECTION_NAME.fullmatch(prefix + "_x" * 8):
        raise SearchError(f"collection={shorten(prefix)} should be letters, digits and underscores")
    collection = f"{prefix}_{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}_{secrets.token_hex(4)}"
    client = connect(uri)
    params = _index_params(spec, len(embeddings))
    _create_collection(client, collection, embedder.embedding_dim, params)
    ids = list(range(len(paths)))
    _insert(client, collection, ids, embeddings, paths, labels)
    _flush(client, collection)
    client.load_collection(collection)
    index = MilvusGalleryIndex(
        client=client,
        uri=uri,
        collection=collection,
        ids=ids,
        paths=list(paths),
        labels=list(labels),
        model=model_identity(embedder),
        index_params=params,
        gallery_root=str(Path(gallery_root).expanduser().resolve()),
        next_id=len(ids),
        created=now_iso(),
        folder=str(folder),
    )
    write_milvus_metadata(folder, index)
    # Only now are the previous builds' collections (and those of killed builds) unreferenced.
    for stale in client.list_collections():
        if stale.startswith(prefix + "_") and stale != collection:
            client.drop_collection(stale)
    log.info("Saved a Milvus index of %d images to %s (collection %s at %s)", len(index), folder, collection, uri)
    return index


def _index_params(spec: IndexSpec, count: int) -> dict[str, Any]:
    params: dict[str, Any] = {"kind": spec.kind}
    if spec.kind == "ivf":
        nlist = max(1, min(spec.nlist, count // 39))
        params.update(nlist=nlist, nprobe=min(spec.nprobe, nlist))
    elif spec.kind == "hnsw":
        params.update(hnsw_m=spec.hnsw_m, ef_construction=spec.ef_construction, ef_search=spec.ef_search)
    return params


def _build_params(params: dict[str, Any]) -> dict[str, Any]:
    if params["kind"] == "ivf":
        return {"nlist": params["nlist"]}
    if params["kind"] == "hnsw":
        return {"M": params["hnsw_m"], "efConstruction": params["ef_construction"]}
    return {}


def _search_params(params: dict[str, Any]) -> dict[str, Any]:
    if params["kind"] == "ivf":
        return {"nprobe": params["nprobe"]}
    if params["kind"] == "hnsw":
        return {"ef": params["ef_search"]}
    return {}


def _create_collection(client: Any, name: str, dim: int, params: dict[str, Any]) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("path", DataType.VARCHAR, max_length=4096)
    schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL_CHARS, nullable=True)
    schema.add_field(
        "folders", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_FOLDER_DEPTH, max_length=4096
    )
    index_params = client.prepare_index_params()
    index_params.add_index(
        "vector", index_type=MILVUS_INDEX_TYPES[params["kind"]], metric_type="IP", params=_build_params(params)
    )
    client.create_collection(name, schema=schema)
    # NOTE: sync=False: a synchronous create_index polls the index state with a timestamp RPC that Milvus Lite
    # does not implement (a logged traceback per collection); the index is registered either way before loading.
    client.create_index(name, index_params, sync=False)


def _check_rows(paths: list[str], labels: list[str | None]) -> None:
    if len(paths) != len(labels):
        raise SearchError(f"{len(paths)} paths but {len(labels)} labels")
    for path, label in zip(paths, labels, strict=True):
        if not is_gallery_relative(path) or path.count("/") >= MAX_FOLDER_DEPTH:
            raise SearchError(f"{shorten(path)} is not a relative gallery path (at most {MAX_FOLDER_DEPTH} folders)")
        if label is not None and len(label) > MAX_LABEL_CHARS:
            raise SearchError(f"label {shorten(label)} is longer than {MAX_LABEL_CHARS} characters")


def _insert(
    client: Any, collection: str, ids: list[int], embeddings: np.ndarray, paths: list[str], labels: list[str | None]
) -> None:
    for start in range(0, len(ids), INSERT_BATCH):
        stop = min(start + INSERT_BATCH, len(ids))
        rows = [
            {
                "id": ids[i],
                "vector": embeddings[i].tolist(),
                "path": paths[i],
                "label": labels[i],
                "folders": folders_of(paths[i]),
            }
            for i in range(start, stop)
        ]
        client.insert(collection, rows)
        log.debug("Inserted rows %d to %d of %d into %s", start, stop, len(ids), collection)


def _flush(client: Any, collection: str) -> None:
    flush = getattr(client, "flush", None)
    if flush is not None:
        flush(collection)


def _read_rows(client: Any, collection: str, next_id: int) -> tuple[list[int], list[str], list[str | None]]:
    """The committed rows' ids, paths and labels, ordered by id (paged, so any gallery size reads)."""
    found: list[tuple[int, str, str | None]] = []
    last = -1
    while True:
        page = client.query(
            collection,
            filter=f"id > {last} and id < {next_id}",
            output_fields=["id", "path", "label"],
            limit=QUERY_BATCH,
        )
        if not page:
            break
        page = sorted(page, key=lambda row: row["id"])
        found.extend((int(r["id"]), r["path"], r.get("label")) for r in page)
        last = found[-1][0]
        if len(page) < QUERY_BATCH:
            break
    return [r[0] for r in found], [r[1] for r in found], [r[2] for r in found]


def write_milvus_metadata(folder: Path, index: MilvusGalleryIndex) -> None:
    """Writes (atomically: this is the commit) the metadata of a Milvus index."""
    atomic_write_text(folder / METADATA_NAME, json.dumps(index.metadata(), indent=1) + "\n")


def read_milvus_metadata(folder: Path) -> dict[str, Any]:
    """The checked ``metadata.json`` of a Milvus index (the common keys by :func:`read_metadata`, then ours)."""
    meta = read_metadata(folder)
    problem = None
    if meta.get("backend") != "milvus":
        problem = f"backend should be milvus, not {shorten(meta.get('backend'))}"
    elif not isinstance(meta.get("uri"), str) or not meta["uri"] or any(ord(c) < 32 for c in meta["uri"]):
        problem = f"uri should be a Milvus Lite file or a server URL, not {shorten(meta.get('uri'))}"
    elif not isinstance(meta.get("collection"), str) or not COLLECTION_NAME.fullmatch(meta["collection"]):
        problem = f"collection should be a Milvus collection name, not {shorten(meta.get('collection'))}"
    elif type(meta.get("next_id")) is not int or meta["next_id"] < 0:
        problem = f"next_id should be a count, not {shorten(meta.get('next_id'))}"
    if problem:
        raise IndexLoadError(
            f"index={folder}: {METADATA_NAME} is damaged or was not written by MetricSearch ({problem}); rebuild "
            f"the index with scripts/build_index.py index.backend=milvus out={folder} overwrite=true"
        )
    return meta
