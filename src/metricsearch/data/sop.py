"""Stanford Online Products (Oh Song et al. 2016, "Deep Metric Learning via Lifted Structured Feature Embedding").

120,053 product photos from eBay, 22,634 products (classes) in 12 categories, 2 to 12 photos per product. The split
is the one the dataset ships: ``Ebay_train.txt`` (11,318 classes, 59,551 images) and ``Ebay_test.txt``
(11,316 classes, 60,502 images). Each list has ONE header line and rows with paths relative to the dataset folder
and an upper-case extension::

    image_id class_id super_class_id path
    1 1 1 bicycle_final/111085122871_0.JPG

Since the smallest classes have two images, ``m=4`` images per class without replacement is impossible on SOP;
``conf/data/sop.yaml`` therefore switches to two images per class (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from metricsearch.data.disk_source import DiskSource, SplitCounts, parse_int, read_rows
from metricsearch.data.records import DatasetError, DatasetSplit, ImageRecords

HEADER = ("image_id", "class_id", "super_class_id", "path")


def product_name(relative_path: str) -> str:
    """A readable class name from an image path: ``bicycle_final/111085122871_0.JPG`` -> ``bicycle/111085122871``."""
    folder, _, filename = relative_path.rpartition("/")
    category = folder.removesuffix("_final") or "product"
    product = Path(filename).stem.rpartition("_")[0] or Path(filename).stem
    return f"{category}/{product}"


@dataclass
class SOPSource(DiskSource):
    """Reads Stanford Online Products with the split of its Ebay_train.txt / Ebay_test.txt (original class ids)."""

    name: ClassVar[str] = "Stanford Online Products"
    option: ClassVar[str] = "sop"
    downloadable: ClassVar[bool] = True
    expected: ClassVar[SplitCounts] = SplitCounts(59551, 60502, 11318, 11316)
    markers: ClassVar[tuple[str, ...]] = ("Ebay_train.txt", "Ebay_test.txt")
    nested: ClassVar[tuple[str, ...]] = ("Stanford_Online_Products",)
    train_description: ClassVar[str] = "the rows of Ebay_train.txt"
    test_description: ClassVar[str] = "the rows of Ebay_test.txt"
    layout_help: ClassVar[str] = (
        "Ebay_train.txt, Ebay_test.txt and the 12 <category>_final/ image folders in the data root "
        "(the Stanford_Online_Products folder of Stanford_Online_Products.zip)"
    )

    def _read_list(self, path: Path) -> ImageRecords:
        if not path.is_file():
            raise self.missing_file_error(path)
        rows = read_rows(path, 4, dataset=self.name, columns=" ".join(HEADER))
        if not rows or tuple(rows[0][1]) != HEADER:
            got = " ".join(rows[0][1]) if rows else "an empty file"
            raise DatasetError(
                f"{self.name}: the first line of {path} should be the header '{' '.join(HEADER)}', got {got!r}"
            )
        folder = path.parent
        paths, labels, names, seen, images = [], [], {}, set(), {}
        for line, (image_id, class_id, _super_class, relative) in rows[1:]:
            ident = parse_int(image_id, path, line, dataset=self.name, what="image_id")
            if ident in seen:
                raise DatasetError(f"{self.name}: {path} line {line}: image_id {ident} appears twice")
            seen.add(ident)
            label = parse_int(class_id, path, line, dataset=self.name, what="class_id")
            relative = relative.strip()
            image = self.listed_path(folder, relative, path, f"line {line}")
            if image in images:
                raise DatasetError(
                    f"{self.name}: {path} line {line}: image {relative} is listed twice (also on line {images[image]})"
                )
            images[image] = line
            paths.append(image)
            labels.append(label)
            names.setdefault(label, product_name(relative))
        if not paths:
            raise DatasetError(f"{self.name}: {path} has a header but no images")
        return ImageRecords(paths, np.asarray(labels, dtype=np.int64), names)

    def _read(self, folder: Path) -> tuple[DatasetSplit, str]:
        train = self._read_list(folder / "Ebay_train.txt")
        test = self._read_list(folder / "Ebay_test.txt")
        return DatasetSplit(train=train, test=test), "Stanford_Online_Products"
