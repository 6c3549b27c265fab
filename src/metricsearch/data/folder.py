"""Any folder of images, one sub-folder per class, under the same zero-shot protocol as the public benchmarks.

Two layouts, detected:

- ``root/<class>/**/<image>``: classes sorted by name; the first ``train_fraction`` of them train and the rest
  are the unseen test classes (as CUB's first 100 of 200 classes train).
- ``root/train/<class>/...`` and ``root/test/<class>/...``: the split is given; a class in both is an error,
  because a test class seen in training would inflate every retrieval metric.

Labels are class indices in sorted-name order (train classes first in the explicit layout); ``class_names`` maps
them back to folder names. Hidden files and folders (``.DS_Store``, macOS ``._*`` resource forks) and
``__MACOSX`` folders are skipped; other files without an image extension are skipped with a warning, so that a
stray ``notes.txt`` is neither trained on nor silently ignored.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from metricsearch.data.disk_source import DiskSource, relative_to_root
from metricsearch.data.io import IMAGE_EXTENSIONS
from metricsearch.data.records import DatasetError, DatasetSplit, ImageRecords

log = logging.getLogger(__name__)


def _is_junk(name: str) -> bool:
    """Hidden entries (including macOS ``._*`` files) and the ``__MACOSX`` folder of zips made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


def _class_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not _is_junk(p.name)), key=lambda p: p.name)


@dataclass
class FolderSource(DiskSource):
    """Reads ``root/<class>/<images>`` (split by class) or ``root/train/`` + ``root/test/`` (split given).

    Attributes:
        train_fraction: Fraction of the classes, in sorted-name order, that train (class-per-folder layout only).
        extensions: File extensions counted as images (compared case-insensitively).
    """

    train_fraction: float = 0.5
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    name: ClassVar[str] = "image folder"
    option: ClassVar[str] = "folder"
    train_description: ClassVar[str] = "the training classes"
    test_description: ClassVar[str] = "the test classes"
    layout_help: ClassVar[str] = "root/<class>/<images> or root/train/<class>/<images> + root/test/<class>/<images>"

    def __post_init__(self) -> None:
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"data.source.train_fraction must be between 0 and 1, got {self.train_fraction}")
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions)

    def _scan_class(self, folder: Path, root: Path) -> list[Path]:
        """The images anywhere under one class folder, sorted; an empty class is an error."""
        images, skipped = [], []
        for current, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not _is_junk(d))
            for name in sorted(files):
                if _is_junk(name):
                    continue
                path = Path(current) / name
                (images if path.suffix.lower() in self.extensions else skipped).append(path)
        if skipped:
            log.warning(
                "%s: skipped %d files without an image extension in %s, e.g. %s",
                self.name,
                len(skipped),
                relative_to_root(folder, root),
                skipped[0].name,
            )
        if not images:
            raise DatasetError(
                f"{self.name}: the class folder {folder} has no images ({', '.join(self.extensions)}); "
                "remove it or add images"
            )
        return images

    def _scan(self, folders: list[Path], first_label: int, root: Path) -> ImageRecords:
        paths, labels, names = [], [], {}
        for offset, class_folder in enumerate(folders):
            images = self._scan_class(class_folder, root)
            label = first_label + offset
            paths += images
            labels += [label] * len(images)
            names[label] = class_folder.name
        records = ImageRecords(paths, np.asarray(labels, dtype=np.int64), names)
        singletons = [
            names[int(c)] for c, n in zip(*np.unique(records.labels, return_counts=True), strict=True) if n == 1
        ]
        if singletons:
            log.warning(
                "%s: %d classes have a single image (e.g. %s); they give no positive pair for training and no "
                "correct answer when used as a query",
                self.name,
                len(singletons),
                singletons[0],
            )
        return records

    def _read(self, folder: Path) -> tuple[DatasetSplit, str]:
        train_dir, test_dir = folder / "train", folder / "test"
        if train_dir.is_dir() or test_dir.is_dir():
            return self._read_given_split(folder, train_dir, test_dir), "train/ + test/ folders"
        classes = _class_folders(folder)
        stray = [p.name for p in folder.iterdir() if p.is_file() and not _is_junk(p.name)]
        if stray:
            log.warning("%s: skipped %d files directly in %s (e.g. %s)", self.name, len(stray), folder, stray[0])
        if len(classes) < 2:
            raise DatasetError(
                f"{self.name}: {folder} has {len(classes)} class sub-folders; expected {self.layout_help} "
                "with at least one training and one test class"
            )
        num_train = round(len(classes) * self.train_fraction)
        if not 1 <= num_train < len(classes):
            raise DatasetError(
                f"{self.name}: data.source.train_fraction={self.train_fraction} of {len(classes)} classes leaves "
                f"{num_train} training and {len(classes) - num_train} test classes; both need at least one"
            )
        records = self._scan(classes, 0, folder)
        is_train = records.labels < num_train
        layout = f"class folders, first {num_train} of {len(classes)} sorted names train"
        return DatasetSplit(train=records.select(is_train), test=records.select(~is_train)), layout

    def _read_given_split(self, folder: Path, train_dir: Path, test_dir: Path) -> DatasetSplit:
        for side in (train_dir, test_dir):
            if not side.is_dir():
                raise DatasetError(
                    f"{self.name}: found {'test' if side is train_dir else 'train'}/ but no {side.name}/ in {folder}; "
                    f"expected {self.layout_help}"
                )
        others = [p.name for p in _class_folders(folder) if p.name not in ("train", "test")]
        if others:
            raise DatasetError(
                f"{self.name}: {folder} has train/ and test/ but also other folders ({', '.join(others[:3])}); "
                "it is unclear whether those are classes: move them into train/ or test/"
            )
        train_classes, test_classes = _class_folders(train_dir), _class_folders(test_dir)
        shared = sorted({p.name for p in train_classes} & {p.name for p in test_classes})
        if shared:
            raise DatasetError(
                f"{self.name}: class {shared[0]!r} is in both train/ and test/ ({len(shared)} such classes); "
                "the zero-shot protocol needs disjoint classes"
            )
        for side, classes in (("train", train_classes), ("test", test_classes)):
            if not classes:
                raise DatasetError(f"{self.name}: {folder / side} has no class sub-folders")
        train = self._scan(train_classes, 0, folder)
        test = self._scan(test_classes, len(train_classes), folder)
        return DatasetSplit(train=train, test=test)
