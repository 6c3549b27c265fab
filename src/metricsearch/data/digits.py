"""scikit-learn's bundled handwritten digits as a tiny real-image dataset, written once as PNG files.

The 1,797 8x8 images (UCI optical digits, values 0-16) ship inside scikit-learn, so this dataset needs no
download. They are stored as upscaled grayscale PNGs and read back through the same loader as photographs,
which exercises the grayscale-to-RGB path that real datasets need. Digits 0-4 train and 5-9 test by default:
the zero-shot protocol in miniature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from metricsearch.data.io import build_once, require_built_files
from metricsearch.data.records import DatasetSplit, ImageRecords

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class DigitsSource:
    """The scikit-learn digits, written as PNG files under ``root`` on first use.

    Attributes:
        root: Folder that holds the written images (one sub-folder per image size).
        image_size: Side of the square PNGs; the 8x8 originals are upscaled bilinearly.
        train_digits: The digits whose images train; all other digits test.
    """

    root: str | Path
    image_size: int = 32
    train_digits: tuple[int, ...] = (0, 1, 2, 3, 4)

    def __post_init__(self) -> None:
        # Hydra hands lists over; keep the field hashable and order-free.
        self.train_digits = tuple(sorted({int(d) for d in self.train_digits}))
        if not self.train_digits or not set(self.train_digits) < set(range(10)):
            raise ValueError(f"train_digits must be a non-empty proper subset of 0-9, got {self.train_digits}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")

    @property
    def folder(self) -> Path:
        """The cache folder of this image size (the split is not part of it: it does not change the files)."""
        return Path(self.root).expanduser().resolve() / f"digits-v{FORMAT_VERSION}-s{self.image_size}"

    def load(self) -> DatasetSplit:
        """Write the PNGs unless a finished copy exists, and split them by digit."""
        params = {"format_version": FORMAT_VERSION, "image_size": self.image_size}
        manifest = build_once(self.folder, params, self._write)
        files = manifest["files"]
        paths = [self.folder / name for name, _ in files]
        require_built_files(self.folder, paths)
        labels = np.array([digit for _, digit in files], dtype=np.int64)
        records = ImageRecords(paths, labels, {d: f"digit-{d}" for d in range(10)})
        return DatasetSplit(
            train=records.select(np.isin(labels, self.train_digits)),
            test=records.select(~np.isin(labels, self.train_digits)),
        )

    def _write(self, folder: Path) -> dict[str, object]:
        """Write every digit image into ``folder``; returns the file list for the manifest."""
        from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

        digits = load_digits()
        log.info("Writing %d scikit-learn digits as PNG files into %s", len(digits.target), folder)
        files = []
        for index, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
            small = Image.fromarray(np.rint(pixels * (255 / 16)).astype(np.uint8))  # values are 0-16
            image = small.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            name = f"images/{int(digit)}/{index:04d}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(folder / name, format="PNG")
            files.append((name, int(digit)))
        return {"files": files}
