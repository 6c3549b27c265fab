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


# How a dataset is evaluated (``DatasetSplit.protocol``):
# - zero_shot: the test classes are never trained on; the test set is searched against itself (CUB, Cars, SOP);
# - closed_set: the test images are of the training classes; the test set is searched against itself (CIFAR);
# - query_gallery: separate query and gallery sets; each query is searched against the gallery only (In-Shop).
ZERO_SHOT, CLOSED_SET, QUERY_GALLERY = "zero_shot", "closed_set", "query_gallery"
PROTOCOLS = (ZERO_SHOT, CLOSED_SET, QUERY_GALLERY)


@dataclass(frozen=True)
class DatasetSplit:
    """A dataset's training images and evaluation images under one of :data:`PROTOCOLS`.

    Attributes:
        train: The training images (validation images are held out of them by the datamodule).
        test: The evaluation set searched against itself (``zero_shot``, ``closed_set``), or the queries
            (``query_gallery``).
        protocol: One of :data:`PROTOCOLS`.
        gallery: The gallery the queries are searched in (``query_gallery`` only).

    Raises:
        DatasetError: the classes contradict the protocol: ``zero_shot`` with a test class in training,
            ``closed_set`` with a test class never trained on, ``query_gallery`` without a gallery, or a gallery
            given to another protocol.
    """

    train: ImageRecords
    test: ImageRecords
    protocol: str = ZERO_SHOT
    gallery: ImageRecords | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise DatasetError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if (self.gallery is not None) != (self.protocol == QUERY_GALLERY):
            raise DatasetError(
                "a gallery goes with the query_gallery protocol, and that protocol needs one "
                f"(got protocol={self.protocol}, gallery={'given' if self.gallery is not None else 'none'})"
            )
        if self.protocol == ZERO_SHOT:
            shared = np.intersect1d(self.train.classes, self.test.classes)
            if len(shared):
                raise DatasetError(
                    f"{len(shared)} classes appear in both train and test (e.g. {shared[:5].tolist()}); "
                    "the zero_shot protocol needs disjoint classes (use the closed_set protocol for shared ones)"
                )
        elif self.protocol == CLOSED_SET and len(self.train):
            unseen = np.setdiff1d(self.test.classes, self.train.classes)
            if len(unseen):
                raise DatasetError(
                    f"{len(unseen)} test classes never appear in training (e.g. {unseen[:5].tolist()}); "
                    "the closed_set protocol evaluates the training classes (use zero_shot for unseen ones)"
                )

    @property
    def evaluation(self) -> ImageRecords:
        """Every image the test evaluation embeds: the test set, or the queries followed by the gallery."""
        if self.gallery is None:
            return self.test
        return ImageRecords(
            [*self.test.paths, *self.gallery.paths],
            np.concatenate([self.test.labels, self.gallery.labels]),
            {**self.gallery.class_names, **self.test.class_names},
        )

    @property
    def num_queries(self) -> int | None:
        """How many of :attr:`evaluation`'s first images are queries (``query_gallery``); None: all of them, each
        searched against the others."""
        return len(self.test) if self.gallery is not None else None
