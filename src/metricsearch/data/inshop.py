"""DeepFashion In-Shop Clothes Retrieval (Liu et al. 2016, "DeepFashion: Powering Robust Clothes Recognition and
Retrieval with Rich Annotations").

52,712 shop photos of 7,982 clothing items. The split is the one the dataset ships in ``Eval/list_eval_partition.txt``:
a line with the number of images, a header line, then one row per image::

    52712
    image_name item_id evaluation_status
    img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train

``train`` rows (25,882 images of 3,997 items) train; ``query`` rows (14,218) are searched in the ``gallery`` rows
(12,612), both of the other 3,985 items, so the split uses the ``query_gallery`` protocol and the customary report
is Recall@1, 10, 20, 30, 40, 50. Item ``id_00000002`` is class 2, named ``id_00000002``.

The image paths start with ``img/``: the folder of ``Img/img.zip``, unpacked either beside ``Eval/`` or inside
``Img/`` (as the Google Drive folder holds it, and as Proxy-Anchor's code reads it); both are found.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from metricsearch.data.disk_source import DiskSource, SplitCounts
from metricsearch.data.records import QUERY_GALLERY, DatasetError, DatasetSplit, ImageRecords

log = logging.getLogger(__name__)

PARTITION_FILE = "Eval/list_eval_partition.txt"
HEADER = ("image_name", "item_id", "evaluation_status")
STATUSES = ("train", "query", "gallery")
ITEM_ID = re.compile(r"id_(\d+)")


@dataclass
class InShopSource(DiskSource):
    """Reads In-Shop with the train / query / gallery partition of its ``Eval/list_eval_partition.txt``."""

    name: ClassVar[str] = "DeepFashion In-Shop"
    option: ClassVar[str] = "inshop"
    downloadable: ClassVar[bool] = False
    expected: ClassVar[SplitCounts] = SplitCounts.query_gallery(
        train_images=25882, query_images=14218, gallery_images=12612, train_classes=3997, test_classes=3985
    )
    markers: ClassVar[tuple[str, ...]] = (PARTITION_FILE,)
    nested: ClassVar[tuple[str, ...]] = ("Inshop_Clothes", "In-shop Clothes Retrieval Benchmark")
    train_description: ClassVar[str] = "the train rows of Eval/list_eval_partition.txt"
    test_description: ClassVar[str] = "the query rows of Eval/list_eval_partition.txt"
    gallery_description: ClassVar[str] = "the gallery rows of Eval/list_eval_partition.txt"
    layout_help: ClassVar[str] = (
        "Eval/list_eval_partition.txt and img/<MEN|WOMEN>/<Category>/id_XXXXXXXX/*.jpg (Img/img.zip unpacked) "
        "in the data root, the img/ folder either there or inside Img/"
    )

    def _read(self, folder: Path) -> tuple[DatasetSplit, str]:
        partition = folder / PARTITION_FILE
        if not partition.is_file():
            raise self.missing_file_error(partition, "partition file")
        # The rows' paths start with img/: beside Eval/ in the usual unpacking, inside Img/ in the Drive folder's.
        image_root, layout = (folder / "Img", "Img/img") if (folder / "Img" / "img").is_dir() else (folder, "img")
        rows = self._read_partition(partition, image_root)
        sides = {
            status: ImageRecords(
                [path for path, _, s, _ in rows if s == status],
                np.asarray([label for _, label, s, _ in rows if s == status], dtype=np.int64),
                {label: item for _, label, s, item in rows if s == status},
            )
            for status in STATUSES
        }
        self._check_items_disjoint(sides, partition)
        queries, gallery = sides["query"], sides["gallery"]
        unmatched = np.setdiff1d(queries.classes, gallery.classes)
        if len(unmatched):
            log.warning(
                "%s: %d query items have no gallery image (e.g. %s): their %d queries have no correct answer and are "
                "left out of the metrics (num_queries_left_out counts them)",
                self.name,
                len(unmatched),
                queries.class_names[int(unmatched[0])],
                int(np.isin(queries.labels, unmatched).sum()),
            )
        split = DatasetSplit(sides["train"], queries, protocol=QUERY_GALLERY, gallery=gallery)
        return split, layout

    def _read_partition(self, path: Path, image_root: Path) -> list[tuple[Path, int, str, str]]:
        """``(image path, label, status, item_id)`` per row, after checking the count line, header and statuses; the
        image paths must lie inside ``image_root`` (see :meth:`~DiskSource.listed_path`), each listed once."""
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{self.name}: {path} is not a text file ({exc}); re-download it") from exc
        numbered = [(number, line.split()) for number, line in enumerate(lines, start=1) if line.strip()]
        if not numbered:
            raise DatasetError(f"{self.name}: {path} is empty; re-download it")
        (count_line, count_fields), rest = numbered[0], numbered[1:]
        if len(count_fields) != 1 or not count_fields[0].isdigit():
            raise DatasetError(
                f"{self.name}: {path} line {count_line} should be the number of images, got {' '.join(count_fields)!r}"
            )
        if not rest or tuple(rest[0][1]) != HEADER:
            got = " ".join(rest[0][1]) if rest else "the end of the file"
            raise DatasetError(
                f"{self.name}: {path} line {rest[0][0] if rest else count_line + 1} should be the header "
                f"'{' '.join(HEADER)}', got {got!r}"
            )
        rows, seen = [], {}
        for number, fields in rest[1:]:
            if len(fields) != 3:
                raise DatasetError(
                    f"{self.name}: {path} line {number} should be '{' '.join(HEADER)}', got {' '.join(fields)!r}"
                )
            name, item, status = fields
            if status not in STATUSES:
                raise DatasetError(
                    f"{self.name}: {path} line {number}: evaluation_status {status!r} is not one of "
                    f"{', '.join(STATUSES)}"
                )
            match = ITEM_ID.fullmatch(item)
            if match is None:
                raise DatasetError(
                    f"{self.name}: {path} line {number}: item_id {item!r} should look like 'id_00000002'"
                )
            image = self.listed_path(image_root, name, path, f"line {number}")
            # Compared once written one way: img/./a.jpg and img//a.jpg are img/a.jpg.
            if image in seen:
                raise DatasetError(
                    f"{self.name}: {path} line {number}: image {name} is listed twice (also on line {seen[image]})"
                )
            seen[image] = number
            rows.append((image, int(match.group(1)), status, item))
        if len(rows) != int(count_fields[0]):
            raise DatasetError(
                f"{self.name}: {path} line {count_line} says {int(count_fields[0]):,} images but the file lists "
                f"{len(rows):,} (a truncated or edited file); re-download it"
            )
        return rows

    def _check_items_disjoint(self, sides: dict[str, ImageRecords], path: Path) -> None:
        """Training items must not be evaluated: the benchmark measures retrieval of unseen items."""
        test_items = np.union1d(sides["query"].classes, sides["gallery"].classes)
        shared = np.intersect1d(sides["train"].classes, test_items)
        if len(shared):
            names = [sides["train"].class_names[int(c)] for c in shared[:3]]
            raise DatasetError(
                f"{self.name}: {path}: {len(shared):,} items have both train and query/gallery images "
                f"(e.g. {', '.join(names)}); the partition must keep training items out of the evaluation"
            )
