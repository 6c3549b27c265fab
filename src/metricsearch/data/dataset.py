"""Datasets over :class:`ImageRecords`: decoded with PIL per image, or gathered from the uint8 cache per batch.

Both accept what :class:`~metricsearch.data.samplers.SeededBatchSampler` yields, a whole batch of
``(index, seed)`` pairs, and return the collated batch; the seed fixes the sample's augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from metricsearch.data.cache import ImageCache
from metricsearch.data.io import load_rgb_image
from metricsearch.data.records import ImageRecords
from metricsearch.data.transforms import CROP_RATIO, TrainTransform, rng_from_torch, sample_resized_crop

# Keys of every batch, defined once.
IMAGE = "image"
LABEL = "label"
INDEX = "index"
# Key of a search gallery's batch (unlabelled): whether the image could be read (metricsearch.search).
OK = "ok"
# Keys of a cached training batch: the crop box of each sample in [0, 1] image fractions (x0, y0, x1, y1), and
# whether to flip it. The augmentation itself runs later, on the batch tensor (metricsearch.data.gpu_augment).
CROP = "crop"
FLIP = "flip"

Item = int | tuple[int, int]


def _split_items(items: Sequence[Item]) -> tuple[list[int], list[int | None]]:
    indices, seeds = [], []
    for item in items:
        index, seed = (item, None) if isinstance(item, int | np.integer) else item
        indices.append(int(index))
        seeds.append(None if seed is None else int(seed))
    return indices, seeds


class ImageDataset(Dataset):
    """Decodes ``records`` to RGB, applies ``transform`` and returns ``{image, label, index}``.

    An item is an index, an ``(index, seed)`` pair (the seed drives a :class:`TrainTransform`), or a list of
    either, which returns the whole batch collated.

    Args:
        records: the images and their classes.
        transform: PIL image -> tensor; a :class:`TrainTransform` also takes the per-sample generator.
        labels: labels to return instead of the original class ids (e.g. remapped to 0..C-1 for proxy losses).
    """

    def __init__(
        self,
        records: ImageRecords,
        transform: Callable[[Image.Image], torch.Tensor],
        labels: np.ndarray | None = None,
    ) -> None:
        self.records = records
        self.transform = transform
        self.labels = records.labels if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int, seed: int | None) -> torch.Tensor:
        image = load_rgb_image(self.records.paths[index])
        if isinstance(self.transform, TrainTransform):
            return self.transform(image, None if seed is None else np.random.default_rng(seed))
        return self.transform(image)

    def __getitem__(self, item: Item | Sequence[Item]) -> dict[str, torch.Tensor | int]:
        if isinstance(item, list):
            indices, seeds = _split_items(item)
            images = [self._load(i, s) for i, s in zip(indices, seeds, strict=True)]
            return {
                IMAGE: torch.stack(images),
                LABEL: torch.from_numpy(self.labels[indices]),
                INDEX: torch.tensor(indices, dtype=torch.int64),
            }
        (index,), (seed,) = _split_items([item])
        return {IMAGE: self._load(index, seed), LABEL: int(self.labels[index]), INDEX: index}


class CachedImageDataset(Dataset):
    """Batches gathered from an :class:`ImageCache`: uint8 images plus, for training, each sample's crop and flip.

    Items are whole batches (lists of indices or ``(index, seed)`` pairs). Images stay uint8 and channels-last
    (B, side, side, 3) until the batch reaches the training device, where
    :class:`~metricsearch.data.gpu_augment.BatchAugment` crops, flips and normalises them; a quarter of the bytes
    of float images cross the DataLoader's shared memory and the host-to-device copy.

    Args:
        cache: the cache of these records (row i is record i).
        labels: the label of every record.
        scale: RandomResizedCrop's area range (``"train"`` caches only; crops are drawn in the original geometry).
        hflip: whether half of the training samples are flipped.
    """

    def __init__(
        self, cache: ImageCache, labels: np.ndarray, scale: Sequence[float] = (0.16, 1.0), hflip: bool = True
    ) -> None:
        if len(labels) != cache.count:
            raise ValueError(f"{len(labels)} labels for a cache of {cache.count} images")
        self.cache = cache
        self.labels = np.asarray(labels, dtype=np.int64)
        self.scale = tuple(scale)
        self.hflip = hflip
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.cache.count

    def __getstate__(self) -> dict:
        # NOTE: a pickled memmap would carry its whole content to every worker; each worker reopens it instead.
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = self.cache.open()
        images, sizes = self._arrays
        indices, seeds = _split_items(list(items))
        batch = {
            IMAGE: torch.from_numpy(np.ascontiguousarray(images[indices])),
            LABEL: torch.from_numpy(self.labels[indices]),
            INDEX: torch.tensor(indices, dtype=torch.int64),
        }
        if self.cache.layout == "train":
            crops = np.empty((len(indices), 4), dtype=np.float32)
            flips = np.empty(len(indices), dtype=bool)
            for row, (index, seed) in enumerate(zip(indices, seeds, strict=True)):
                rng = np.random.default_rng(seed) if seed is not None else rng_from_torch()
                width, height = (int(v) for v in sizes[index])
                top, left, box_height, box_width = sample_resized_crop(width, height, self.scale, rng, CROP_RATIO)
                crops[row] = (left / width, top / height, (left + box_width) / width, (top + box_height) / height)
                # Drawn after the crop, as TrainTransform does, so both paths use a seed alike.
                flips[row] = rng.random() < 0.5 and self.hflip
            batch[CROP] = torch.from_numpy(crops)
            batch[FLIP] = torch.from_numpy(flips)
        return batch
