"""The common currency of every dataset: image paths with class labels, split by class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(RuntimeError):
    """A dataset on disk is missing, incomplete or malformed; the message says what and how to fix it."""


@dataclass(frozen=True)
class ImageRecords:
    """Images of one split: absolute paths and their original integer class ids."""

    paths: list[Path]
    labels: np.ndarray
    class_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def select(self, mask: np.ndarray) -> ImageRecords:
        """The records where ``mask`` is true."""
        mask = np.asarray(mask, dtype=bool)
        paths = [p for p, keep in zip(self.paths, mask, strict=True) if keep]
        kept = set(np.unique(self.labels[mask]).tolist())
        names = {c: n for c, n in self.class_names.items() if c in kept}
        return ImageRecords(paths, self.labels[mask], names)

    def select_classes(self, classes: np.ndarray | list[int]) -> ImageRecords:
        """The records whose class is one of ``classes``."""
        return self.select(np.isin(self.labels, np.asarray(classes)))


@dataclass(frozen=True)
class DatasetSplit:
    """The zero-shot protocol: training classes and disjoint, never-seen test classes."""

    train: ImageRecords
    test: ImageRecords

    def __post_init__(self) -> None:
        shared = np.intersect1d(self.train.classes, self.test.classes)
        if len(shared):
            raise DatasetError(
                f"{len(shared)} classes appear in both train and test (e.g. {shared[:5].tolist()}); "
                "the metric-learning protocol needs disjoint classes"
            )
