"""Embedding a gallery through ``lightning.Trainer.predict``, on one process or sharded across DDP ranks.

Going through the trainer is what lets a gallery too large for one machine be embedded with the same code
on several GPUs or nodes: each rank embeds its share of the files (Lightning's distributed sampler),
writes it as a shard file into a folder all ranks can see, and rank 0 merges the shards by image index,
dropping the repeats the sampler pads with.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from metricsearch.data.dataset import IMAGE, INDEX, OK
from metricsearch.data.io import ImageLoadError, load_rgb_image
from metricsearch.inference.errors import InferenceError
from metricsearch.inference.model_loading import Embedder, TorchEmbedder
from metricsearch.utils.atomic_io import atomic_path
from metricsearch.utils.trainer_settings import quiet_trainer_settings

log = logging.getLogger(__name__)

# The folder, inside the work folder embed_files is given (an index build's output folder), that holds the shards.
SHARDS_NAME = ".embedding-shards"
# Progress is logged after the first batch (the speed is known) and each time another tenth of the batches is
# done: a progress bar shows nothing in a log file (rich only draws its final state when the output is not a
# terminal), and hours-long builds run under nohup or a scheduler.
PROGRESS_STEPS = 10


class GalleryDataset(Dataset):
    """Preprocessed gallery images by position; an unreadable file becomes a blank image flagged ``ok=False``.

    A gallery scraped from anywhere may hold a few broken files; they are reported and left out of the index
    instead of killing an hours-long embedding run at the last batch.

    Args:
        paths: absolute image paths.
        embedder: supplies the preprocessing.
    """

    def __init__(self, paths: Sequence[Path], embedder: Embedder) -> None:
        self.paths = list(paths)
        self.transform = embedder.transform
        size = embedder.preprocessing["image_size"]
        self.blank_shape = (3, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = self.transform(load_rgb_image(self.paths[index]))
            ok = True
        except ImageLoadError as err:
            log.warning("Skipping an image: %s", err)
            image, ok = torch.zeros(self.blank_shape), False
        return {IMAGE: image, INDEX: index, OK: ok}


class GalleryEmbeddingModule(L.LightningModule):
    """Predict-only Lightning module: embeds gallery batches and writes this rank's shard at the end.

    Args:
        embedder: the model; a torch embedder's network becomes a submodule so Lightning moves it to the
            rank's device, an ONNX one runs on the CPU as it is.
        shard_dir: folder shared by all ranks where each writes ``shard-RANK.npz``.
    """

    def __init__(self, embedder: Embedder, shard_dir: str | Path) -> None:
        super().__init__()
        self.embedder = embedder
        if isinstance(embedder, TorchEmbedder):
            self.model = embedder.model
        self.shard_dir = Path(shard_dir)
        self._indices: list[torch.Tensor] = []
        self._embeddings: list[torch.Tensor] = []
        self._ok: list[torch.Tensor] = []
        self._started, self._images_done, self._next_report = 0.0, 0, 1

    def on_predict_start(self) -> None:
        self._indices, self._embeddings, self._ok = [], [], []
        self._started, self._images_done, self._next_report = time.perf_counter(), 0, 1
        if self.trainer.is_global_zero:
            # Shards of an interrupted earlier run must not be merged into this one.
            shutil.rmtree(self.shard_dir, ignore_errors=True)
            self.shard_dir.mkdir(parents=True)
        self.trainer.strategy.barrier()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        embeddings = self.embedder.embed_tensor(batch[IMAGE])
        self._embeddings.append(embeddings)
        self._indices.append(batch[INDEX].cpu())
        self._ok.append(batch[OK].cpu())
        # Returned for prediction-writer callbacks; the shards are what the index is built from.
        return embeddings

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._images_done += len(batch[INDEX])
        total = self.trainer.num_predict_batches[dataloader_idx]
        if not self.trainer.is_global_zero or not math.isfinite(total) or total <= 0:
            return
        done = batch_idx + 1
        if done == 1 or done * PROGRESS_STEPS >= self._next_report * total:
            self._next_report = done * PROGRESS_STEPS // total + 1
            rate = self._images_done / max(time.perf_counter() - self._started, 1e-9)
            log.info("Embedded %d/%d batches (%d images, %.0f images/s)", done, total, self._images_done, rate)

    def on_predict_epoch_end(self) -> None:
        dim = self.embedder.embedding_dim
        indices = torch.cat(self._indices).numpy() if self._indices else np.zeros(0, dtype=np.int64)
        embeddings = torch.cat(self._embeddings).numpy() if self._embeddings else np.zeros((0, dim), np.float32)
        ok = torch.cat(self._ok).numpy() if self._ok else np.zeros(0, dtype=bool)
        with atomic_path(self.shard_dir / f"shard-{self.global_rank:05d}.npz") as tmp:
            np.savez(tmp, indices=indices, embeddings=embeddings.astype(np.float32), ok=ok)
        self._indices, self._embeddings, self._ok = [], [], []
        # Rank 0 merges once every shard is on disk.
        self.trainer.strategy.barrier()


def merge_shards(shard_dir: Path, count: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[count, dim]`` and the readable-image mask from every rank's shard, ordered by index.

    Raises:
        InferenceError: an image index is missing from every shard (a rank died or wrote elsewhere).
    """
    embeddings = np.zeros((count, dim), dtype=np.float32)
    ok = np.zeros(count, dtype=bool)
    seen = np.zeros(count, dtype=bool)
    shards = sorted(shard_dir.glob("shard-*.npz"))
    for shard in shards:
        with np.load(shard) as data:
            # The distributed sampler pads the last shards with repeats of the first images; rewriting the
            # same index with the same embedding is harmless.
            embeddings[data["indices"]] = data["embeddings"]
            ok[data["indices"]] = data["ok"]
            seen[data["indices"]] = True
    if not seen.all():
        raise InferenceError(
            f"{int((~seen).sum())} of {count} images are in none of the {len(shards)} shards under {shard_dir}; "
            "the folder must be shared by every rank (e.g. on a network file system)"
        )
    return embeddings, ok


def embed_files(
    embedder: Embedder,
    paths: Sequence[Path],
    work_dir: str | Path,
    trainer: L.Trainer | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Embeds ``paths`` through ``trainer.predict``; returns (embeddings, ok mask) on rank 0, None elsewhere.

    Args:
        embedder: the model and its preprocessing.
        paths: absolute image paths.
        work_dir: a folder all ranks can write to; the shards go to a sub-folder that is removed afterwards.
        trainer: a trainer for prediction (e.g. DDP over several GPUs); one CPU/GPU process when None.
        batch_size: images per batch and rank.
        num_workers: data-loader worker processes per rank (image decoding).
    """
    if trainer is None:
        trainer = make_predict_trainer()
    shard_dir = Path(work_dir) / SHARDS_NAME
    module = GalleryEmbeddingModule(embedder, shard_dir)
    loader = DataLoader(
        GalleryDataset(paths, embedder),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
    )
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    try:
        return merge_shards(shard_dir, len(paths), embedder.embedding_dim)
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)


def predict_trainer_settings(progress_bar: bool = True) -> dict[str, Any]:
    """Trainer arguments every embedding run needs, whatever the hardware settings.

    No logger, no checkpoints, no model summary; the distributed sampler on (each rank must embed a disjoint
    share, while the training default turns it off for the m-per-class sampler); no BatchNorm synchronisation
    (inference uses running statistics).
    """
    return {
        **quiet_trainer_settings(),
        "enable_progress_bar": progress_bar,
        "use_distributed_sampler": True,
        "sync_batchnorm": False,
    }


def make_predict_trainer(progress_bar: bool = True, **kwargs: Any) -> L.Trainer:
    """A trainer for embedding only (see :func:`predict_trainer_settings`), with a progress bar by default.

    Args:
        progress_bar: show Lightning's progress bar.
        kwargs: hardware arguments of ``lightning.Trainer`` (``accelerator``, ``devices``, ``strategy``,
            ``num_nodes``, ``precision``...); one CPU process by default.
    """
    settings: dict[str, Any] = {"accelerator": "cpu", "devices": 1, **kwargs}
    settings.update(predict_trainer_settings(progress_bar))
    return L.Trainer(**settings)
