"""Any folder of images, one sub-folder per class: for training, and for evaluating a model on one's own photos.

Three layouts, detected:

- ``root/<class>/**/<image>``: classes sorted by name; the first ``train_fraction`` of them train and the rest
  are the unseen test classes (as CUB's first 100 of 200 classes train). ``train_fraction=0`` makes every class a
  test class, for evaluation only.
- ``root/train/<class>/...`` and ``root/test/<class>/...``: the split is given. Under the default ``zero_shot``
  protocol a class in both is an error, because a test class seen in training would inflate every retrieval
  metric; ``protocol=closed_set`` reads them as new images of the training classes instead (CIFAR's protocol).
- ``root/query/<class>/...`` and ``root/gallery/<class>/...``, optionally with ``root/train/<class>/...``: each
  query is searched in the gallery only (In-Shop's protocol). Without ``train/`` the folder is for evaluation
  only. A query class that has no gallery image gets a warning: its queries have no correct answer and are left
  out of the metrics.

Labels are class indices over the sorted folder names (train classes first in the given-split layouts); the same
folder name is the same label wherever it appears, and ``class_names`` maps labels back to folder names. Hidden
files and folders (``.DS_Store``, macOS ``._*`` resource forks) and ``__MACOSX`` folders are skipped; other files
without an image extension are skipped with a warning, so that a stray ``notes.txt`` is neither trained on nor
silently ignored. So are class folders and files that lead out of the root through a symbolic link (the rule of
:mod:`metricsearch.utils.paths`, as the index builder applies it to a gallery): nothing outside the root is read.
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
from metricsearch.data.records import CLOSED_SET, QUERY_GALLERY, ZERO_SHOT, DatasetError, DatasetSplit, ImageRecords
from metricsearch.utils.paths import split_inside

log = logging.getLogger(__name__)

# The protocols ``data.source.protocol`` may ask for; query_gallery follows from the query/ + gallery/ layout.
CHOOSABLE_PROTOCOLS = (ZERO_SHOT, CLOSED_SET)
SPLIT_FOLDERS = ("train", "test", "query", "gallery")


def _is_junk(name: str) -> bool:
    """Hidden entries (including macOS ``._*`` files) and the ``__MACOSX`` folder of zips made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


def _class_folders(folder: Path, root: Path | None = None) -> list[Path]:
    """The class sub-folders of ``folder``, sorted by name; those that lead out of ``root`` are left out, warned."""
    folders = sorted((p for p in folder.iterdir() if p.is_dir() and not _is_junk(p.name)), key=lambda p: p.name)
    return _inside(folders, root or folder, "class folders")


def _inside(paths: list[Path], root: Path, what: str) -> list[Path]:
    """The ``paths`` that resolve inside ``root``; the others are left out with a warning that names a few."""
    inside, outside = split_inside(root, paths)
    if outside:
        log.warning(
            "%s: skipped %d %s that lead outside the data root %s through a symbolic link, e.g. %s",
            FolderSource.name,
            len(outside),
            what,
            root,
            [str(paths[i]) for i in outside[:3]],
        )
    return [paths[i] for i in inside]


@dataclass
class FolderSource(DiskSource):
    """Reads ``root/<class>/<images>``, ``root/train/`` + ``root/test/``, or ``root/query/`` + ``root/gallery/``
    (with an optional ``root/train/``).

    Attributes:
        train_fraction: Fraction of the classes, in sorted-name order, that train (class-per-folder layout only);
            0 makes every class a test class (evaluation only).
        extensions: File extensions counted as images (compared case-insensitively).
        protocol: How ``train/`` + ``test/`` are read: ``zero_shot`` (disjoint classes) or ``closed_set`` (the
            test images are of the training classes). None: ``zero_shot``, or ``query_gallery`` for the
            ``query/`` + ``gallery/`` layout.
    """

    train_fraction: float = 0.5
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    protocol: str | None = None

    name: ClassVar[str] = "image folder"
    option: ClassVar[str] = "folder"
    train_description: ClassVar[str] = "the training classes"
    test_description: ClassVar[str] = "the test classes"
    layout_help: ClassVar[str] = (
        "root/<class>/<images>, root/train/<class>/<images> + root/test/<class>/<images>, or "
        "root/query/<class>/<images> + root/gallery/<class>/<images> (+ an optional root/train/<class>/<images>)"
    )
    # A folder may hold evaluation images only (query/ + gallery/ without train/, or train_fraction=0).
    train_optional: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (0 < self.train_fraction < 1 or self.train_fraction == 0):
            raise ValueError(
                f"data.source.train_fraction must be between 0 and 1 (0: every class is evaluated, none trains), "
                f"got {self.train_fraction}"
            )
        if self.protocol not in (None, *CHOOSABLE_PROTOCOLS):
            raise ValueError(
                f"data.source.protocol={self.protocol} is not one of {', '.join(CHOOSABLE_PROTOCOLS)} (query_gallery "
                "needs no setting: it is the reading of root/query/ + root/gallery/)"
            )
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
        images = _inside(images, root, "files")
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

    def _scan(
        self, folders: list[Path], labels_by_name: dict[str, int], root: Path, self_search: bool = True
    ) -> ImageRecords:
        """The images of ``folders``, each labelled ``labels_by_name[folder name]``; ``self_search``: warn of classes
        of one image (searched against its own set, such an image has no correct answer)."""
        paths, labels, names = [], [], {}
        for class_folder in folders:
            images = self._scan_class(class_folder, root)
            label = labels_by_name[class_folder.name]
            paths += images
            labels += [label] * len(images)
            names[label] = class_folder.name
        records = ImageRecords(paths, np.asarray(labels, dtype=np.int64), names)
        singletons = [
            names[int(c)] for c, n in zip(*np.unique(records.labels, return_counts=True), strict=True) if n == 1
        ]
        if singletons and self_search:
            log.warning(
                "%s: %d classes have a single image (e.g. %s); they give no positive pair for training and no "
                "correct answer when used as a query",
                self.name,
                len(singletons),
                singletons[0],
            )
        return records

    def _read(self, folder: Path) -> tuple[DatasetSplit, str]:
        present = {name for name in SPLIT_FOLDERS if (folder / name).is_dir()}
        if present & {"query", "gallery"}:
            return self._read_query_gallery(folder, present), "query/ + gallery/ folders" + (
                " with train/" if "train" in present else " (evaluation only)"
            )
        if present:
            split = self._read_given_split(folder, folder / "train", folder / "test")
            return split, f"train/ + test/ folders, {split.protocol}"
        if self.protocol == CLOSED_SET:
            raise DatasetError(
                f"{self.name}: data.source.protocol=closed_set needs the split given as root/train/<class>/ + "
                f"root/test/<class>/ (the same classes on both sides); {folder} has class folders only"
            )
        classes = _class_folders(folder)
        stray = [p.name for p in folder.iterdir() if p.is_file() and not _is_junk(p.name)]
        if stray:
            log.warning("%s: skipped %d files directly in %s (e.g. %s)", self.name, len(stray), folder, stray[0])
        if not classes and stray:
            raise DatasetError(
                f"{self.name}: {folder} holds images but no class sub-folders; put each class's images in a folder "
                f"named after it: {self.layout_help}"
            )
        minimum = 1 if self.train_fraction == 0 else 2
        if len(classes) < minimum:
            raise DatasetError(
                f"{self.name}: {folder} has {len(classes)} class sub-folders; expected {self.layout_help}"
                + (" with at least one training and one test class" if minimum == 2 else "")
            )
        num_train = round(len(classes) * self.train_fraction)
        if self.train_fraction and not 1 <= num_train < len(classes):
            raise DatasetError(
                f"{self.name}: data.source.train_fraction={self.train_fraction} of {len(classes)} classes leaves "
                f"{num_train} training and {len(classes) - num_train} test classes; both need at least one"
            )
        records = self._scan(classes, {p.name: i for i, p in enumerate(classes)}, folder)
        is_train = records.labels < num_train
        if num_train:
            layout = f"class folders, first {num_train} of {len(classes)} sorted names train"
        else:
            layout = f"class folders, all {len(classes)} evaluated (train_fraction=0, evaluation only)"
        return DatasetSplit(train=records.select(is_train), test=records.select(~is_train)), layout

    def _read_given_split(self, folder: Path, train_dir: Path, test_dir: Path) -> DatasetSplit:
        for side in (train_dir, test_dir):
            if not side.is_dir():
                raise DatasetError(
                    f"{self.name}: found {'test' if side is train_dir else 'train'}/ but no {side.name}/ in {folder}; "
                    f"expected {self.layout_help}"
                )
        self._refuse_other_folders(folder, ("train", "test"))
        train_classes, test_classes = _class_folders(train_dir, folder), _class_folders(test_dir, folder)
        for side, classes in (("train", train_classes), ("test", test_classes)):
            if not classes:
                raise DatasetError(f"{self.name}: {folder / side} has no class sub-folders")
        train_names, test_names = [p.name for p in train_classes], [p.name for p in test_classes]
        protocol = self.protocol or ZERO_SHOT
        if protocol == ZERO_SHOT:
            shared = sorted(set(train_names) & set(test_names))
            if shared:
                raise DatasetError(
                    f"{self.name}: class {shared[0]!r} is in both train/ and test/ ({len(shared)} such classes); "
                    "the zero-shot protocol needs disjoint classes (set data.source.protocol=closed_set if the test "
                    "images are new images of the training classes)"
                )
        else:
            unseen = sorted(set(test_names) - set(train_names))
            if unseen:
                raise DatasetError(
                    f"{self.name}: class {unseen[0]!r} is in test/ but not in train/ ({len(unseen)} such classes); "
                    "the closed_set protocol evaluates the training classes (leave data.source.protocol at "
                    "zero_shot for disjoint classes)"
                )
        labels = _labels_by_name(train_names, test_names)
        train = self._scan(train_classes, labels, folder)
        test = self._scan(test_classes, labels, folder)
        return DatasetSplit(train=train, test=test, protocol=protocol)

    def _read_query_gallery(self, folder: Path, present: set[str]) -> DatasetSplit:
        for side in ("query", "gallery"):
            if side not in present:
                other = "gallery" if side == "query" else "query"
                raise DatasetError(
                    f"{self.name}: found {other}/ but no {side}/ in {folder}; expected "
                    "root/query/<class>/<images> + root/gallery/<class>/<images>"
                )
        if "test" in present:
            raise DatasetError(
                f"{self.name}: {folder} has query/ + gallery/ and also test/; keep either test/ (searched against "
                "itself) or query/ + gallery/"
            )
        if self.protocol is not None:
            raise DatasetError(
                f"{self.name}: data.source.protocol={self.protocol} does not apply to query/ + gallery/ folders, "
                "which are always read as queries searched in the gallery; remove the setting"
            )
        self._refuse_other_folders(folder, ("train", "query", "gallery"))
        sides = {
            side: _class_folders(folder / side, folder) for side in ("train", "query", "gallery") if side in present
        }
        for side, classes in sides.items():
            if not classes:
                raise DatasetError(f"{self.name}: {folder / side} has no class sub-folders")
        names = {side: [p.name for p in classes] for side, classes in sides.items()}
        labels = _labels_by_name(names.get("train", []), names["query"] + names["gallery"])
        # A query or gallery class of one image is fine: queries are answered from the gallery.
        records = {
            side: self._scan(classes, labels, folder, self_search=side == "train") for side, classes in sides.items()
        }
        unanswerable = sorted(set(names["query"]) - set(names["gallery"]))
        if unanswerable:
            queries = int(np.isin(records["query"].labels, [labels[n] for n in unanswerable]).sum())
            log.warning(
                "%s: %d query classes have no gallery images (e.g. %r): their %d queries have no correct answer "
                "and are left out of the metrics",
                self.name,
                len(unanswerable),
                unanswerable[0],
                queries,
            )
        train = records.get("train") or ImageRecords([], np.zeros(0, dtype=np.int64))
        return DatasetSplit(train=train, test=records["query"], protocol=QUERY_GALLERY, gallery=records["gallery"])

    def _refuse_other_folders(self, folder: Path, expected: tuple[str, ...]) -> None:
        others = [p.name for p in _class_folders(folder) if p.name not in expected]
        if others:
            raise DatasetError(
                f"{self.name}: {folder} has {' and '.join(e + '/' for e in expected)} but also other folders "
                f"({', '.join(others[:3])}); it is unclear whether those are classes: move them into "
                f"{' or '.join(e + '/' for e in expected)}"
            )


def _labels_by_name(first: list[str], then: list[str]) -> dict[str, int]:
    """Label of each class name: ``first`` in sorted order, then the names of ``then`` not among them, sorted."""
    ordered = sorted(set(first)) + sorted(set(then) - set(first))
    return {name: label for label, name in enumerate(ordered)}
