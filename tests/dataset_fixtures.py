"""Miniature copies of CUB-200-2011, Cars196 (both layouts), SOP and an image folder, in the exact formats.

The real datasets cannot be downloaded in tests, so each builder writes the annotation files as distributed
(1-based text files, MATLAB struct arrays written with ``scipy.io.savemat`` so that ``scipy.io.loadmat`` returns
the same structure as for the real files, SOP's header line and upper-case ``.JPG``) with a few 16 x 16 JPEGs per
class. Class ids stay in the real ranges (CUB 1-200, Cars 1-196, SOP 1-11,318 train / 11,319-22,634 test), so
the standard split applies unchanged. Builders return the counts the split must give.

Plain functions, so that any test module can import them and build the copies it needs.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from metricsearch.data.disk_source import SplitCounts

IMAGE_SIZE = 16
SOP_CATEGORIES = ("bicycle", "chair", "kettle")


def image_bytes(seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small image whose colour depends on ``seed``, encoded in memory."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(0, 12, size=(IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int, mode: str = "RGB", fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, mode, fmt))
    return path


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def copy_tree(source: Path, dest: Path) -> Path:
    """A private copy of a session-wide miniature dataset that a test may damage."""
    shutil.copytree(source, dest)
    return dest


# --- CUB-200-2011 ---


def cub_folder_name(class_id: int) -> str:
    return f"{class_id:03d}.Bird_number_{class_id}"


def make_cub(root: Path, images_per_class: int = 2, num_classes: int = 200) -> SplitCounts:
    """``root`` as the CUB_200_2011 folder: images/, images.txt, image_class_labels.txt, classes.txt, extras."""
    images, labels, classes, split, boxes = [], [], [], [], []
    image_id = 0
    for class_id in range(1, num_classes + 1):
        folder = cub_folder_name(class_id)
        classes.append(f"{class_id} {folder}")
        for k in range(images_per_class):
            image_id += 1
            relative = f"{folder}/Bird_Number_{class_id}_{k:04d}_{image_id}.jpg"
            write_image(root / "images" / relative, seed=image_id)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {k % 2}")
            boxes.append(f"{image_id} 1.0 2.0 12.0 13.0")
    write_lines(root / "images.txt", images)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "classes.txt", classes)
    write_lines(root / "train_test_split.txt", split)
    write_lines(root / "bounding_boxes.txt", boxes)
    # macOS resource forks as found in some copies of the archive: not images, must be ignored.
    (root / "._images.txt").write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
    (root / "images" / cub_folder_name(1) / "._Bird_Number_1_0000_1.jpg").write_bytes(b"\x00\x05\x16\x07")
    last_train = min(num_classes, 100)
    return SplitCounts(
        last_train * images_per_class,
        (num_classes - last_train) * images_per_class,
        last_train,
        num_classes - last_train,
    )


# --- Cars196 ---


def cars_class_names(num_classes: int = 196) -> np.ndarray:
    """``class_names`` as a 1 x N cell array of strings."""
    names = np.empty((1, num_classes), dtype=object)
    for i in range(num_classes):
        names[0, i] = f"Maker Model {i + 1} Sedan 2012"
    return names


def struct_array(rows: list[dict[str, object]], fields: tuple[str, ...]) -> np.ndarray:
    """A 1 x N MATLAB struct array: numbers as 1 x 1 uint8/uint16 matrices and strings as char arrays."""
    array = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f in fields:
            value = row[f]
            if isinstance(value, str):
                array[0, i][f] = np.array([value])
            else:
                dtype = np.uint8 if f in ("class", "test") else np.uint16
                array[0, i][f] = np.array([[value]], dtype=dtype)
    return array


FLAT_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
DEVKIT_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _box() -> dict[str, int]:
    return {"bbox_x1": 1, "bbox_y1": 2, "bbox_x2": 14, "bbox_y2": 15}


def make_cars_flat(root: Path, images_per_class: int = 2) -> SplitCounts:
    """``car_ims/000001.jpg ...`` + ``cars_annos.mat`` (annotations with relative_im_path, class, test)."""
    rows = []
    for class_id in range(1, 197):
        for k in range(images_per_class):
            number = len(rows) + 1
            relative = f"car_ims/{number:06d}.jpg"
            write_image(root / relative, seed=10_000 + number)
            rows.append({"relative_im_path": relative, **_box(), "class": class_id, "test": k % 2})
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        root / "cars_annos.mat",
        {"annotations": struct_array(rows, FLAT_FIELDS), "class_names": cars_class_names()},
    )
    return SplitCounts(98 * images_per_class, 98 * images_per_class, 98, 98)


def make_cars_devkit(root: Path, nested: bool = False) -> SplitCounts:
    """The devkit layout: per class one image in cars_train/ and one in cars_test/, merged by the reader.

    Args:
        root: The dataset folder.
        nested: Put the images in ``cars_train/cars_train/`` as the Kaggle copy does.
    """
    halves = {"cars_train": [], "cars_test": []}
    for class_id in range(1, 197):
        for half, rows in halves.items():
            fname = f"{len(rows) + 1:05d}.jpg"
            folder = root / half / half if nested else root / half
            write_image(folder / fname, seed=20_000 + class_id * 2 + (half == "cars_test"))
            rows.append({**_box(), "class": class_id, "fname": fname})
    devkit = root / "devkit"
    devkit.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": cars_class_names()})
    scipy.io.savemat(
        devkit / "cars_train_annos.mat", {"annotations": struct_array(halves["cars_train"], DEVKIT_FIELDS)}
    )
    scipy.io.savemat(
        root / "cars_test_annos_withlabels.mat", {"annotations": struct_array(halves["cars_test"], DEVKIT_FIELDS)}
    )
    # The public test annotations of the devkit: the same fields without "class".
    public_fields = tuple(f for f in DEVKIT_FIELDS if f != "class")
    scipy.io.savemat(devkit / "cars_test_annos.mat", {"annotations": struct_array(halves["cars_test"], public_fields)})
    return SplitCounts(196, 196, 98, 98)


# --- Stanford Online Products ---


def make_sop(root: Path, classes_per_side: int = 12, class_sizes: Sequence[int] = (2, 3, 4)) -> SplitCounts:
    """Ebay_train.txt / Ebay_test.txt / Ebay_info.txt with the header line, images as <category>_final/*.JPG.

    Class sizes cycle through ``class_sizes`` (2, 3 and 4 images by default, so some classes have the 2 images that
    make m=4 impossible; SOP's real sizes are 2 to 12).
    """
    header = "image_id class_id super_class_id path"
    rows = {"train": [], "test": []}
    image_id = 0
    counts = {"train": 0, "test": 0}
    for side, first_class in (("train", 1), ("test", 11319)):
        for offset in range(classes_per_side):
            class_id = first_class + offset
            super_class = offset % len(SOP_CATEGORIES) + 1
            category = SOP_CATEGORIES[super_class - 1]
            product = 111000000000 + class_id
            for k in range(class_sizes[offset % len(class_sizes)]):
                image_id += 1
                relative = f"{category}_final/{product}_{k}.JPG"
                write_image(root / relative, seed=30_000 + image_id)
                rows[side].append(f"{image_id} {class_id} {super_class} {relative}")
                counts[side] += 1
    write_lines(root / "Ebay_train.txt", [header, *rows["train"]])
    write_lines(root / "Ebay_test.txt", [header, *rows["test"]])
    write_lines(root / "Ebay_info.txt", [header, *rows["train"], *rows["test"]])
    return SplitCounts(counts["train"], counts["test"], classes_per_side, classes_per_side)


# --- a plain image folder ---


def make_folder(root: Path, num_classes: int = 8, images_per_class: int = 3) -> SplitCounts:
    """``root/<class>/*.jpg`` with macOS junk and a stray text file beside the images."""
    for c in range(num_classes):
        for k in range(images_per_class):
            write_image(root / f"class_{c:02d}" / f"img_{k}.jpg", seed=40_000 + c * 10 + k)
    (root / "class_00" / "._img_0.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "class_00" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "class_01" / "notes.txt").write_text("taken on a rainy day\n")
    half = num_classes // 2
    return SplitCounts(half * images_per_class, (num_classes - half) * images_per_class, half, num_classes - half)
