"""The index workflows behind the scripts: build an index, add a gallery's new images to it, query it.

``scripts/build_index.py`` and ``scripts/search.py`` (:mod:`metricsearch.cli.search`) call these; the index itself,
and opening it with a model checked to be the one that built it, are :mod:`metricsearch.search.index`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate

from metricsearch.data.io import load_rgb_image
from metricsearch.inference.model_loading import Embedder
from metricsearch.inference.predict_embeddings import embed_files, predict_trainer_settings
from metricsearch.search.backends import AnyIndex, load_gallery_index
from metricsearch.search.errors import SearchError
from metricsearch.search.filters import SearchFilter
from metricsearch.search.gallery import inside_root, list_gallery_images
from metricsearch.search.grid import gallery_loader, save_result_grid
from metricsearch.search.index import METADATA_NAME, GalleryIndex, Hit, IndexSpec, recorded_embedder
from metricsearch.search.milvus_index import BACKENDS, build_milvus_index
from metricsearch.search.rerank import SearchPostprocess, search_postprocessed
from metricsearch.utils.config import CONFIG_DIR, ConfigError, check_group_options

log = logging.getLogger(__name__)


def _embed_readable(
    embedder: Embedder,
    root: Path,
    paths: list[str],
    labels: list[str | None],
    work_dir: Path,
    trainer: L.Trainer | None,
    batch_size: int,
    num_workers: int,
) -> tuple[np.ndarray, list[str], list[str | None]] | None:
    """Embeds ``root / paths``; drops unreadable files. None on ranks other than 0."""
    result = embed_files(embedder, [root / p for p in paths], work_dir, trainer, batch_size, num_workers)
    if result is None:
        return None
    embeddings, ok = result
    if not ok.all():
        skipped = [p for p, good in zip(paths, ok, strict=True) if not good]
        log.warning("Left %d unreadable images out of the index, e.g. %s", len(skipped), skipped[:5])
    keep = np.flatnonzero(ok)
    return embeddings[keep], [paths[i] for i in keep], [labels[i] for i in keep]


def build_index(
    embedder: Embedder,
    gallery: str | Path,
    out: str | Path,
    spec: IndexSpec | None = None,
    paths: Sequence[str] | None = None,
    labels: Sequence[str | None] | None = None,
    trainer: L.Trainer | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    overwrite: bool = False,
    backend: str = "faiss",
    uri: str | Path | None = None,
) -> AnyIndex | None:
    """Embeds a gallery and saves its index to ``out``.

    Args:
        embedder: the model.
        gallery: the gallery folder.
        out: the index folder (created; must be shared by all ranks when the trainer runs several).
        spec: the faiss index to build; exact search by default.
        paths: relative image paths to index instead of every image under ``gallery`` (those that lead out of
            it through a symbolic link are left out, like unreadable files).
        labels: their labels (with ``paths``); by default, the name of each image's folder.
        trainer: the trainer that embeds (e.g. DDP); one process when None.
        batch_size: images per batch and process.
        num_workers: image-decoding worker processes per rank.
        overwrite: replace an index already in ``out`` (otherwise that is an error).
        backend: where the vectors live (``index.backend=``): ``faiss`` (files in ``out``) or ``milvus`` (a Milvus
            collection).
        uri: with ``milvus`` (``index.uri=``), a Milvus Lite file (default ``out/gallery.db``) or a server URL.

    Returns:
        The saved index on rank 0; None on the other ranks, which only embed their share.
    """
    gallery, out = Path(gallery).expanduser().resolve(), Path(out).expanduser().resolve()
    if backend not in BACKENDS:
        raise SearchError(f"index.backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if uri and backend != "milvus":
        raise SearchError("index.uri= names a Milvus database: it needs index.backend=milvus")
    if (out / METADATA_NAME).is_file() and not overwrite:
        raise SearchError(f"out={out} already holds an index: add=true adds new images, overwrite=true rebuilds")
    if paths is None:
        paths, found_labels = list_gallery_images(gallery)
        labels = found_labels if labels is None else labels
    paths = list(paths)
    labels = list(labels) if labels is not None else [Path(p).parent.name or None for p in paths]
    # Files the server would refuse to serve (links out of the gallery) are not indexed.
    kept = set(inside_root(gallery, paths))
    labels = [label for path, label in zip(paths, labels, strict=True) if path in kept]
    paths = [path for path in paths if path in kept]
    out.mkdir(parents=True, exist_ok=True)
    log.info("Embedding %d images of %s with %s", len(paths), gallery, embedder.describe())
    embedded = _embed_readable(embedder, gallery, paths, labels, out, trainer, batch_size, num_workers)
    if embedded is None:
        return None
    if backend == "milvus":
        return build_milvus_index(*embedded, embedder=embedder, gallery_root=gallery, folder=out, spec=spec, uri=uri)
    index = GalleryIndex.build(*embedded, embedder=embedder, gallery_root=gallery, spec=spec)
    index.save(out)
    return index


def add_to_index(
    index_dir: str | Path,
    embedder: Embedder | None = None,
    gallery: str | Path | None = None,
    trainer: L.Trainer | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    backend: str | None = None,
    uri: str | Path | None = None,
) -> AnyIndex | None:
    """Embeds the images of the gallery that the index does not hold yet, and saves the grown index.

    Images already indexed are not embedded again. The model must be the one that built the index (by
    default it is loaded from where the index says it came from). ``backend`` and ``uri`` are checked and
    applied as :func:`~metricsearch.search.backends.load_gallery_index` does (a Milvus index then records ``uri``).

    Returns:
        The saved index on rank 0; None on the other ranks.
    """
    index = load_gallery_index(index_dir, gallery_root=gallery, backend=backend, uri=uri)
    embedder = embedder or recorded_embedder(index)
    index.check_embedder(embedder)
    root = Path(index.gallery_root)
    paths, labels = list_gallery_images(root)
    new = [i for i, p in enumerate(paths) if p not in index]
    if not new:
        log.info("No new images under %s; the index is up to date (%d images)", root, len(index))
        return index
    log.info("Adding %d new images to the %d already indexed", len(new), len(index))
    embedded = _embed_readable(
        embedder,
        root,
        [paths[i] for i in new],
        [labels[i] for i in new],
        Path(index_dir).expanduser().resolve(),
        trainer,
        batch_size,
        num_workers,
    )
    if embedded is None:
        return None
    index.add(*embedded)
    if index.backend == "faiss":  # a Milvus index commits its additions itself
        index.save(index_dir)
    return index


def remove_from_index(
    index_dir: str | Path,
    paths: Sequence[str] = (),
    ids: Sequence[int] = (),
    gallery: str | Path | None = None,
    backend: str | None = None,
    uri: str | Path | None = None,
) -> tuple[AnyIndex, list[str]]:
    """Removes images from an index by gallery path and by id (no re-embedding); returns the index and the paths.

    The change is atomic as every save is: the index is the old one or the new one. ``backend`` and ``uri`` as
    for :func:`add_to_index`.
    """
    index = load_gallery_index(index_dir, gallery_root=gallery, backend=backend, uri=uri)
    removed = index.remove(list(paths), list(ids))
    if removed and index.backend == "faiss":
        index.save(index_dir)
    return index, removed


def search_files(
    index: AnyIndex, embedder: Embedder, queries: Sequence[str | Path], k: int = 10, where: SearchFilter | None = None
) -> list[list[Hit]]:
    """The top ``k`` gallery images of each query image file (only those that pass ``where``, if given)."""
    images = [load_rgb_image(q) for q in queries]
    return index.search(embedder.embed_images(images), k, where)


def search_image(
    index: AnyIndex,
    embedder: Embedder,
    query: str | Path,
    k: int = 10,
    grid: str | Path | None = None,
    where: SearchFilter | None = None,
    post: SearchPostprocess | None = None,
) -> list[Hit]:
    """The top ``k`` gallery images of one query image file; with ``grid``, also drawn into that PNG.

    ``where`` restricts the results, ``post`` re-ranks them (:mod:`~metricsearch.search.rerank`). The picture
    frames results of the query's class when the query is itself a gallery image.
    """
    query = Path(query)
    image = load_rgb_image(query)
    hits = search_postprocessed(index, embedder.embed_images([image]), k, where, post)[0]
    if grid is not None:
        save_result_grid(
            image,
            hits,
            gallery_loader(index.gallery_root),
            Path(grid),
            query_label=_label_if_in_gallery(index, query),
            query_caption=query.name,
            title=f"top {len(hits)} of {len(index)} images, {embedder.describe()}",
        )
    return hits


def _label_if_in_gallery(index: AnyIndex, query: Path) -> str | None:
    """The query's label when the query is itself a gallery file (so the grid can mark same-class results)."""
    try:
        relative = query.resolve().relative_to(Path(index.gallery_root).resolve()).as_posix()
    except ValueError:
        return None
    return index.labels[index.position_of(relative)] if relative in index else None


def make_configured_trainer(name: str, overrides: Sequence[str], output_dir: Path) -> L.Trainer:
    """A prediction trainer from the ``conf/trainer/NAME.yaml`` option and ``trainer.KEY=VALUE`` overrides.

    The option is composed within the training config (so ``trainer=ddp`` means what it means for
    ``train.py``) and instantiated with the settings every embedding run needs on top.

    Raises:
        ConfigError: the option or an override does not compose.
    """
    GlobalHydra.instance().clear()
    args = [f"trainer={name}", f"paths.output_dir={output_dir}", *overrides]
    check_group_options(args)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=args)
    except HydraException as err:
        raise ConfigError(f"trainer options {args}: {err}") from err
    finally:
        GlobalHydra.instance().clear()
    return instantiate(cfg.trainer, **predict_trainer_settings())
