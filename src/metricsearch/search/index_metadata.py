"""The index folder's ``metadata.json``: its format, reading it, and checking it as untrusted data.

An index folder may come from anyone, so every key of ``metadata.json`` is checked for presence, type and range
before anything it names is used: data files must be plain names in the folder (and match their recorded size and
SHA-256), ``gallery_root`` an absolute folder other than the file system's root, gallery paths relative, inside the
root and names of image files in no hidden folder. Every problem is one message that names the index and gives the
command that rebuilds it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metricsearch.data.io import IMAGE_EXTENSIONS
from metricsearch.inference.model_choice import CHOICE_OF_SOURCE
from metricsearch.inference.model_loading import file_sha256
from metricsearch.inference.predict_embeddings import SHARDS_NAME
from metricsearch.search.errors import IndexLoadError
from metricsearch.utils.atomic_io import atomic_path, temp_file_target
from metricsearch.utils.messages import shorten
from metricsearch.utils.paths import relative_name_problem

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
        raise IndexLoadError(no_index_message(folder))
    size = meta_path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise IndexLoadError(
            damaged_metadata(folder, {}, f"it is {size:,} bytes, over the limit of {MAX_METADATA_BYTES:,}")
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
        raise IndexLoadError(damaged_metadata(folder, {}, f"it holds {shorten(meta)}, not an object"))
    if meta.get("format") != FORMAT_NAME or type(meta.get("version")) is not int or meta["version"] != FORMAT_VERSION:
        raise IndexLoadError(
            f"index={folder} is not a MetricSearch index of version {FORMAT_VERSION} "
            f"(format {shorten(meta.get('format'))}, version {shorten(meta.get('version'))}); rebuild it"
        )
    problem = metadata_problem(meta)
    if problem:
        raise IndexLoadError(damaged_metadata(folder, meta, problem))
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


def damaged_metadata(folder: Path, meta: dict[str, Any], problem: str) -> str:
    return (
        f"index={folder}: {METADATA_NAME} is damaged or was not written by MetricSearch ({problem}), so the index "
        f"is not used; {rebuild_command(folder, meta)}"
    )


def write_data_file(path: Path, write: Callable[[Path], None]) -> dict[str, Any]:
    """Writes one data file atomically with ``write(tmp)``; returns the size and checksum that metadata records."""
    with atomic_path(path) as tmp:
        write(tmp)
        # Hashed from the temporary file: what gets renamed into place is exactly what was measured.
        record = {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
    return record


def check_data_file(path: Path, recorded: dict[str, Any] | None, folder: Path, meta: dict[str, Any]) -> None:
    """Refuses a data file that is missing or differs from the size and checksum recorded when it was saved."""
    if not path.is_file():
        raise IndexLoadError(damaged_message(folder, meta, path, f"it is missing, although {METADATA_NAME} names it"))
    if recorded is None:
        return
    size = path.stat().st_size
    if size != recorded["bytes"]:
        state = "truncated" if size < recorded["bytes"] else "longer than written"
        reason = f"it is {size:,} bytes, but {recorded['bytes']:,} were written ({state})"
        raise IndexLoadError(damaged_message(folder, meta, path, reason))
    if file_sha256(path) != recorded["sha256"]:
        reason = "its content differs from what was written (SHA-256 mismatch: corrupted or replaced)"
        raise IndexLoadError(damaged_message(folder, meta, path, reason))


def damaged_message(folder: Path, meta: dict[str, Any], path: Path, reason: str) -> str:
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
        args += ["index.backend=milvus", f"index.uri={text(meta, 'uri', 'URI')}"]
    return f"rebuild the index: python scripts/build_index.py {shlex.join(args)}"


def no_index_message(folder: Path) -> str:
    """Why ``folder`` holds no index: it does not exist, holds something else, or holds an unfinished build.

    What a build leaves in the folder besides the index: the embedding shards (see
    :func:`~metricsearch.inference.predict_embeddings.embed_files`) and the temporary files of the atomic writes of the
    data files and the metadata.
    """
    if not folder.is_dir():
        state = "nothing is there" if not folder.exists() else "it is a file"
        return f"index={folder} is not a folder ({state}); build an index with scripts/build_index.py"
    leftovers = sorted(
        p.name for p in folder.iterdir() if p.name == SHARDS_NAME or is_index_temp_file(p) or is_data_file_name(p.name)
    )
    if leftovers:
        return (
            f"index={folder} has no {METADATA_NAME} (no finished index): a build was interrupted and left "
            f"{', '.join(leftovers[:3])}; run scripts/build_index.py with out={folder} again"
        )
    return f"index={folder} has no {METADATA_NAME} (no finished index); build one with scripts/build_index.py"


def is_data_file_name(name: str) -> bool:
    return (name.startswith("vectors-") and name.endswith(".faiss")) or (
        name.startswith("embeddings-") and name.endswith(".npy")
    )


def is_index_file_name(name: str) -> bool:
    """Whether ``name`` is one of the files a save writes: the metadata or a data file."""
    return name == METADATA_NAME or is_data_file_name(name)


def is_index_temp_file(path: Path) -> bool:
    """Whether ``path`` is a temporary file of an atomic write of this index's data files or metadata."""
    target = temp_file_target(path)
    return target is not None and is_index_file_name(target[0])


def now_iso() -> str:
    """The current time as ``metadata.json`` records it (ISO 8601, UTC, whole seconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def common_metadata(index: Any, backend: str) -> dict[str, Any]:
    """The keys every backend's ``metadata.json`` opens with: format, backend, times, size, index, model, root.

    Args:
        index: a faiss or Milvus gallery index (``created``, ``embedding_dim``, ``index_params``, ``model``,
            ``gallery_root`` and a length).
        backend: ``faiss`` or ``milvus``.
    """
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "backend": backend,
        "created": index.created,
        "updated": now_iso(),
        "count": len(index),
        "embedding_dim": index.embedding_dim,
        "index": index.index_params,
        "model": index.model,
        "gallery_root": index.gallery_root,
    }
