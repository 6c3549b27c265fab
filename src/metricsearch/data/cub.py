"""CUB-200-2011 (Wah et al. 2011, "The Caltech-UCSD Birds-200-2011 Dataset", CNS-TR-2011-001).

11,788 photos of 200 bird species. The metric-learning protocol (Oh Song et al. 2016, "Deep Metric Learning via
Lifted Structured Feature Embedding") trains on classes 1-100 (5,864 images) and tests on the unseen classes
101-200 (5,924 images). The archive's ``train_test_split.txt`` is the *classification* split and is not used.

Layout as distributed (space-separated, header-less, 1-based ids)::

    CUB_200_2011/images.txt              1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
    CUB_200_2011/image_class_labels.txt  1 1
    CUB_200_2011/classes.txt             1 001.Black_footed_Albatross
    CUB_200_2011/images/001.Black_footed_Albatross/*.jpg

Only the files listed in ``images.txt`` are read, so the macOS ``._*`` files some copies carry are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from metricsearch.data.disk_source import DiskSource, SplitCounts, parse_int, read_rows
from metricsearch.data.records import DatasetError, DatasetSplit, ImageRecords

NUM_CLASSES = 200
# Classes 1..LAST_TRAIN_CLASS train, the rest test.
LAST_TRAIN_CLASS = 100


def readable_class_name(folder_name: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black_footed_Albatross`` (the numeric prefix repeats the id)."""
    prefix, dot, rest = folder_name.partition(".")
    return rest if dot and prefix.isdigit() and rest else folder_name


@dataclass
class CUBSource(DiskSource):
    """Reads CUB-200-2011 and splits it by class id: 1-100 train, 101-200 test (labels are the original ids)."""

    name: ClassVar[str] = "CUB-200-2011"
    option: ClassVar[str] = "cub"
    downloadable: ClassVar[bool] = True
    expected: ClassVar[SplitCounts] = SplitCounts(5864, 5924, 100, 100)
    markers: ClassVar[tuple[str, ...]] = ("images.txt",)
    nested: ClassVar[tuple[str, ...]] = ("CUB_200_2011",)
    train_description: ClassVar[str] = "classes 1-100"
    test_description: ClassVar[str] = "classes 101-200"
    layout_help: ClassVar[str] = (
        "images.txt, image_class_labels.txt, classes.txt and images/<NNN.Class_Name>/*.jpg in the data root "
        "(the CUB_200_2011 folder of CUB_200_2011.tgz)"
    )

    def _table(
        self, folder: Path, filename: str, columns: str, int_values: bool = False, image_root: Path | None = None
    ) -> dict[int, str | int | Path]:
        """``id -> rest of line`` of one of the 1-based id files (ids must be unique): an int with ``int_values``; with
        ``image_root``, the image path under it (see :meth:`~DiskSource.listed_path`), each image listed once."""
        path = folder / filename
        if not path.is_file():
            raise self.missing_file_error(path)
        table: dict[int, str | int | Path] = {}
        images: dict[Path, int] = {}
        for line, (key, value) in read_rows(path, 2, dataset=self.name, columns=columns):
            ident = parse_int(key, path, line, dataset=self.name, what="the id")
            if ident in table:
                raise DatasetError(f"{self.name}: {path} line {line}: id {ident} appears twice")
            value = value.strip()
            if int_values:
                table[ident] = parse_int(value, path, line, dataset=self.name, what="the class id")
            elif image_root is not None:
                image = self.listed_path(image_root, value, path, f"line {line}")
                if image in images:
                    raise DatasetError(
                        f"{self.name}: {path} line {line}: image {value} is listed twice (also on line {images[image]})"
                    )
                images[image] = line
                table[ident] = image
            else:
                table[ident] = value
        if not table:
            raise DatasetError(f"{self.name}: {path} is empty")
        return table

    def _read(self, folder: Path) -> tuple[DatasetSplit, str]:
        images = self._table(folder, "images.txt", "<image_id> <class_folder>/<file>.jpg", image_root=folder / "images")
        labels = self._table(folder, "image_class_labels.txt", "<image_id> <class_id>", int_values=True)
        classes = self._table(folder, "classes.txt", "<class_id> <NNN.Class_Name>")

        unlabelled = sorted(set(images) - set(labels))
        if unlabelled:
            raise DatasetError(
                f"{self.name}: {len(unlabelled)} image ids of images.txt have no class in image_class_labels.txt "
                f"(e.g. image {unlabelled[0]}); the two files come from different copies"
            )
        unknown_images = sorted(set(labels) - set(images))
        if unknown_images:
            raise DatasetError(
                f"{self.name}: {len(unknown_images)} image ids of image_class_labels.txt are not in images.txt "
                f"(e.g. image {unknown_images[0]}); the two files come from different copies"
            )
        unknown_classes = sorted(set(labels.values()) - set(classes))
        if unknown_classes:
            raise DatasetError(
                f"{self.name}: image_class_labels.txt uses class {unknown_classes[0]}, which classes.txt does not list"
            )
        out_of_range = sorted(c for c in classes if not 1 <= c <= NUM_CLASSES)
        if out_of_range:
            raise DatasetError(
                f"{self.name}: classes.txt lists class {out_of_range[0]}, outside 1-{NUM_CLASSES}; "
                "this is not CUB-200-2011 (for another dataset use data=folder)"
            )
        used = set(labels.values())
        empty = [c for c in sorted(classes) if c not in used]
        if empty:
            raise DatasetError(
                f"{self.name}: class {empty[0]} ({classes[empty[0]]}) of classes.txt has no images in "
                f"image_class_labels.txt ({len(empty)} empty classes)"
            )

        order = sorted(images)
        paths = [images[i] for i in order]
        label_array = np.array([labels[i] for i in order], dtype=np.int64)
        names = {c: readable_class_name(classes[c]) for c in classes}
        records = ImageRecords(paths, label_array, names)
        is_train = label_array <= LAST_TRAIN_CLASS
        return DatasetSplit(train=records.select(is_train), test=records.select(~is_train)), "CUB_200_2011"
