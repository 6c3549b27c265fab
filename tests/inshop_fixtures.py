"""A miniature DeepFashion In-Shop copy in the exact format: ``Eval/list_eval_partition.txt`` (the count line, the
header, space-padded rows) and small real JPEGs under ``img/<GENDER>/<Category>/id_XXXXXXXX/``.

Plain functions, so that any test module can import them and build the copies it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metricsearch.data.disk_source import SplitCounts
from tests.dataset_fixtures import write_image, write_lines

CATEGORIES = (("WOMEN", "Dresses"), ("MEN", "Denim"), ("WOMEN", "Blouses_Shirts"))
VIEWS = ("front", "side", "back", "full", "additional", "flat")
HEADER = "image_name item_id evaluation_status"


@dataclass
class InShopCopy:
    """What :func:`make_inshop` wrote: the counts the reader must find and the ``(image_name, item_id)`` rows of each
    evaluation status."""

    root: Path
    counts: SplitCounts
    rows: dict[str, list[tuple[str, str]]]

    @property
    def partition(self) -> Path:
        return self.root / "Eval" / "list_eval_partition.txt"


def item_id(number: int) -> str:
    return f"id_{number:08d}"


def make_inshop(
    root: Path,
    train_items: int = 6,
    test_items: int = 4,
    images_per_item: int = 5,
    queries_per_item: int = 2,
    inside_img: bool = False,
) -> InShopCopy:
    """``root`` as the In-Shop folder: ``Eval/list_eval_partition.txt`` and ``img/...`` JPEGs.

    Training items are numbered 1, 3, 5, ... and test items 2, 4, 6, ... (item ids do not tell train from test in
    the real file either); each test item has ``queries_per_item`` queries and the rest of its ``images_per_item``
    images in the gallery.

    Args:
        root: The dataset folder.
        train_items: Items with ``train`` rows.
        test_items: Items with ``query`` and ``gallery`` rows.
        images_per_item: Images of every item.
        queries_per_item: Of a test item's images, how many are queries.
        inside_img: Put the ``img/`` folder in ``Img/`` (as the Google Drive folder holds it) instead of beside
            ``Eval/``; the listed paths start with ``img/`` either way.
    """
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "query": [], "gallery": []}
    # Listed item by item, train and test items interleaved, as in the real file; its columns are padded with
    # spaces, so the reader must not depend on the exact widths.
    lines = []
    image_root = root / "Img" if inside_img else root
    test_numbers = [2 * k + 2 for k in range(test_items)]
    for number in sorted([2 * k + 1 for k in range(train_items)] + test_numbers):
        gender, category = CATEGORIES[number % len(CATEGORIES)]
        for k in range(images_per_item):
            name = f"img/{gender}/{category}/{item_id(number)}/{k + 1:02d}_{k % 4 + 1}_{VIEWS[k % len(VIEWS)]}.jpg"
            write_image(image_root / name, seed=50_000 + 100 * number + k)
            status = "train" if number not in test_numbers else ("query" if k < queries_per_item else "gallery")
            rows[status].append((name, item_id(number)))
            lines.append(f"{name:<64}{item_id(number):<16}{status}")
    write_lines(root / "Eval" / "list_eval_partition.txt", [str(len(lines)), HEADER, *lines])
    counts = SplitCounts.query_gallery(
        train_images=train_items * images_per_item,
        query_images=test_items * queries_per_item,
        gallery_images=test_items * (images_per_item - queries_per_item),
        train_classes=train_items,
        test_classes=test_items,
    )
    return InShopCopy(root, counts, rows)
