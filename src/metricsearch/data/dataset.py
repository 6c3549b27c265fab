"""A map-style dataset over :class:`ImageRecords`, going through the one image-decoding path."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from metricsearch.data.io import load_rgb_image
from metricsearch.data.records import ImageRecords

# Keys of every batch, defined once.
IMAGE = "image"
LABEL = "label"
INDEX = "index"


class ImageDataset(Dataset):
    """Decodes ``records`` to RGB, applies ``transform`` and returns ``{image, label, index}``.

    Args:
        records: the images and their classes.
        transform: PIL image -> tensor.
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

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image = load_rgb_image(self.records.paths[index])
        return {IMAGE: self.transform(image), LABEL: int(self.labels[index]), INDEX: index}
