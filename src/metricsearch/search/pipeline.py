"""The search workflows behind the scripts: build an index, add to it, open it with a checked model, query it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np

from metricsearch.data.io import load_rgb_image
from metricsearch.search.embedder import Embedder, load_embedder, load_embedder_from_source
from metricsearch.search.embedding import embed_files
from metricsearch.search.errors import ModelLoadError, SearchError
from metricsearch.search.gallery import inside_root, list_gallery_images
from metricsearch.search.index import METADATA_NAME, GalleryIndex, Hit, IndexSpec

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


def recorded_embedder(index: GalleryIndex) -> Embedder:
    """The model ``index`` records it was built with; an error names the index, since the index named the model."""
    try:
        return load_embedder_from_source(index.model["source"])
    except ModelLoadError as err:
        raise ModelLoadError(f"index={index.folder}: {err}") from err


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
) -> GalleryIndex | None:
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

    Returns:
        The saved index on rank 0; None on the other ranks, which only embed their share.
    """
    gallery, out = Path(gallery).expanduser().resolve(), Path(out).expanduser().resolve()
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
) -> GalleryIndex | None:
    """Embeds the images of the gallery that the index does not hold yet, and saves the grown index.

    Images already indexed are not embedded again. The model must be the one that built the index (by
    default it is loaded from where the index says it came from).

    Returns:
        The saved index on rank 0; None on the other ranks.
    """
    index = GalleryIndex.load(index_dir, gallery_root=gallery)
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
    index.save(index_dir)
    return index


def open_index(
    index_dir: str | Path,
    ckpt: str | Path | None = None,
    model: str | Path | None = None,
    backbone: str | None = None,
    gallery: str | Path | None = None,
) -> tuple[GalleryIndex, Embedder]:
    """An index and a model checked to be the one that built it.

    Args:
        index_dir: the index folder.
        ckpt: a checkpoint to embed queries with, instead of the model the index records.
        model: an ONNX export to embed queries with (same weights as the index's model).
        backbone: a pretrained backbone name to embed queries with.
        gallery: where the gallery images are now, if they moved.

    Raises:
        IndexMismatchError: the model given is not the one that built the index.
    """
    index = GalleryIndex.load(index_dir, gallery_root=gallery)
    if ckpt or model or backbone:
        embedder = load_embedder(ckpt=ckpt, model=model, backbone=backbone)
    else:
        embedder = recorded_embedder(index)
    index.check_embedder(embedder)
    return index, embedder


def search_files(
    index: GalleryIndex, embedder: Embedder, queries: Sequence[str | Path], k: int = 10
) -> list[list[Hit]]:
    """The top ``k`` gallery images of each query image file."""
    images = [load_rgb_image(q) for q in queries]
    return index.search(embedder.embed_images(images), k)
