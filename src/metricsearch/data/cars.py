"""Cars196 / Stanford Cars (Krause et al. 2013, "3D Object Representations for Fine-Grained Categorization").

16,185 photos of 196 car models. The metric-learning protocol trains on classes 1-98 (8,054 images) and tests on
the unseen classes 99-196 (8,131 images), whatever half of the original classification split an image was in.

Two layouts are in circulation since the original site went offline; which one a folder holds is detected:

- **car_ims**: ``car_ims/000001.jpg`` ... and ``cars_annos.mat``, whose struct array ``annotations`` has the
  fields ``relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test`` and whose ``class_names`` holds
  the 196 names.
- **devkit**: ``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat`` (``class_names``),
  ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (fields
  ``bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname``); the two halves are merged before splitting by class. The
  devkit's public ``cars_test_annos.mat`` has no ``class`` field and cannot be used. Mirrors move the .mat files
  between the root and ``devkit/`` and some (Kaggle) nest the images as ``cars_train/cars_train/``: both are
  accepted.

Fields are read by name, never by position, so a file re-saved with another field order still reads correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.io

from metricsearch.data.disk_source import DiskSource, SplitCounts
from metricsearch.data.records import DatasetError, DatasetSplit, ImageRecords

NUM_CLASSES = 196
# Classes 1..LAST_TRAIN_CLASS train, the rest test.
LAST_TRAIN_CLASS = 98
FLAT_LAYOUT = "car_ims + cars_annos.mat"
DEVKIT_LAYOUT = "devkit (cars_train + cars_test merged)"


def load_mat(path: Path, dataset: str) -> dict:
    """``scipy.io.loadmat(path)`` with the failure modes of downloaded .mat files turned into clear errors."""
    try:
        return scipy.io.loadmat(path)
    except NotImplementedError as exc:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise DatasetError(
            f"{dataset}: {path} is a MATLAB v7.3 (HDF5) file, not the v5 file that was distributed; "
            "use the original file"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - scipy raises ValueError, TypeError, OSError... for damaged files
        raise DatasetError(
            f"{dataset}: {path} cannot be read as a MATLAB file ({type(exc).__name__}: {exc}); re-download it"
        ) from exc


def struct_fields(mat: dict, variable: str, fields: tuple[str, ...], path: Path, dataset: str) -> dict[str, list]:
    """The named fields of the struct array ``variable``, each as a list with one numpy array per element.

    ``loadmat`` returns a 1 x N struct array as a structured ndarray whose elements are small 2-D arrays
    (``[[1]]`` for a number, ``['car_ims/000001.jpg']`` for a string); each is flattened here.
    """
    if variable not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{dataset}: {path} has no variable '{variable}' (it has: {', '.join(found) or 'none'})")
    array = np.asarray(mat[variable])
    names = array.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise DatasetError(
            f"{dataset}: '{variable}' in {path} has no field {', '.join(repr(f) for f in missing)} "
            f"(its fields: {', '.join(names) or 'none; it is not a struct array'})"
        )
    return {f: [np.asarray(v).ravel() for v in array[f].ravel()] for f in fields}


def _scalar_int(value: np.ndarray, index: int, name: str, path: Path, dataset: str) -> int:
    if value.size != 1:
        raise DatasetError(f"{dataset}: {path}: field '{name}' of annotation {index + 1} is empty or not a number")
    return int(value[0])


def _string(value: np.ndarray, index: int, name: str, path: Path, dataset: str) -> str:
    if value.size != 1 or not isinstance(value[0], str):
        raise DatasetError(f"{dataset}: {path}: field '{name}' of annotation {index + 1} is not a string")
    return value[0].strip()


def class_names_of(mat: dict, path: Path, dataset: str) -> list[str]:
    """The ``class_names`` cell array (1 x 196) as a list; name ``i`` belongs to class id ``i + 1``."""
    if "class_names" not in mat:
        raise DatasetError(f"{dataset}: {path} has no variable 'class_names'")
    names = []
    for index, value in enumerate(np.asarray(mat["class_names"], dtype=object).ravel()):
        names.append(_string(np.asarray(value).ravel(), index, "class_names", path, dataset))
    return names


@dataclass
class Cars196Source(DiskSource):
    """Reads Cars196 in either layout and splits it by class id: 1-98 train, 99-196 test (original ids as labels)."""

    name: ClassVar[str] = "Cars196"
    option: ClassVar[str] = "cars196"
    downloadable: ClassVar[bool] = True
    expected: ClassVar[SplitCounts] = SplitCounts(8054, 8131, 98, 98)
    markers: ClassVar[tuple[str, ...]] = ("cars_annos.mat", "car_ims", "devkit", "cars_train", "cars_test")
    nested: ClassVar[tuple[str, ...]] = ("stanford_cars", "cars196", "Cars196")
    train_description: ClassVar[str] = "classes 1-98"
    test_description: ClassVar[str] = "classes 99-196"
    layout_help: ClassVar[str] = (
        "either car_ims/*.jpg + cars_annos.mat, or cars_train/, cars_test/, devkit/cars_meta.mat, "
        "devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat"
    )

    def _read(self, folder: Path) -> tuple[DatasetSplit, str]:
        flat_annotations = folder / "cars_annos.mat"
        if flat_annotations.is_file() and (folder / "car_ims").is_dir():
            return self._read_flat(folder, flat_annotations), FLAT_LAYOUT
        devkit_parts = ("cars_train", "cars_test", "devkit", "cars_train_annos.mat", "cars_meta.mat")
        if any((folder / part).exists() for part in devkit_parts):
            return self._read_devkit(folder), DEVKIT_LAYOUT
        if flat_annotations.is_file():
            raise DatasetError(f"{self.name}: found {flat_annotations} but no car_ims/ folder of images next to it")
        entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[:8]
        raise DatasetError(
            f"{self.name}: no known layout in {folder} (it holds: {', '.join(entries) or 'nothing'}); "
            f"expected {self.layout_help}"
        )

    def _records(self, paths: list[Path], labels: list[int], names: list[str], source: Path) -> DatasetSplit:
        """Check the class ids against the class names, then split by class id."""
        label_array = np.asarray(labels, dtype=np.int64)
        if len(names) != NUM_CLASSES:
            raise DatasetError(
                f"{self.name}: {source} names {len(names)} classes, expected {NUM_CLASSES}; this is not Cars196"
            )
        bad = label_array[(label_array < 1) | (label_array > len(names))]
        if len(bad):
            raise DatasetError(f"{self.name}: class id {int(bad[0])} in the annotations is outside 1-{len(names)}")
        counts = np.bincount(label_array, minlength=len(names) + 1)[1:]
        empty = np.flatnonzero(counts == 0) + 1
        if len(empty):
            raise DatasetError(
                f"{self.name}: class {int(empty[0])} ({names[empty[0] - 1]}) has no images in the annotations "
                f"({len(empty)} empty classes)"
            )
        records = ImageRecords(paths, label_array, {i + 1: n for i, n in enumerate(names)})
        is_train = label_array <= LAST_TRAIN_CLASS
        return DatasetSplit(train=records.select(is_train), test=records.select(~is_train))

    def _read_flat(self, folder: Path, annotations_path: Path) -> DatasetSplit:
        mat = load_mat(annotations_path, self.name)
        columns = struct_fields(mat, "annotations", ("relative_im_path", "class"), annotations_path, self.name)
        paths, labels = [], []
        for i, (rel, cls) in enumerate(zip(columns["relative_im_path"], columns["class"], strict=True)):
            relative = _string(rel, i, "relative_im_path", annotations_path, self.name)
            paths.append(self.listed_path(folder, relative, annotations_path, f"annotation {i + 1}"))
            labels.append(_scalar_int(cls, i, "class", annotations_path, self.name))
        names = class_names_of(mat, annotations_path, self.name)
        return self._records(paths, labels, names, annotations_path)

    def _find(self, folder: Path, candidates: list[Path], what: str) -> Path:
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise DatasetError(
            f"{self.name}: the devkit layout needs {what}, looked for {' and '.join(str(c) for c in candidates)}; "
            f"expected {self.layout_help}"
        )

    def _image_folder(self, folder: Path, name: str) -> Path:
        images = folder / name
        if (images / name).is_dir():  # Kaggle's copy nests cars_train/cars_train/
            return images / name
        if not images.is_dir():
            raise self.missing_file_error(images, "image folder")
        return images

    def _read_devkit(self, folder: Path) -> DatasetSplit:
        devkit = folder / "devkit"
        meta = self._find(folder, [devkit / "cars_meta.mat", folder / "cars_meta.mat"], "cars_meta.mat")
        train_annotations = self._find(
            folder, [devkit / "cars_train_annos.mat", folder / "cars_train_annos.mat"], "cars_train_annos.mat"
        )
        # Some mirrors keep the browser's duplicate suffix, e.g. "cars_test_annos_withlabels (1).mat".
        test_candidates = [folder / "cars_test_annos_withlabels.mat", devkit / "cars_test_annos_withlabels.mat"]
        test_candidates += sorted(folder.glob("cars_test_annos_withlabels*.mat"))
        try:
            test_annotations = self._find(folder, test_candidates, "cars_test_annos_withlabels.mat")
        except DatasetError:
            public = devkit / "cars_test_annos.mat"
            note = f" ({public} has no class labels, so it cannot replace it)" if public.is_file() else ""
            raise DatasetError(
                f"{self.name}: the devkit layout needs cars_test_annos_withlabels.mat in {folder} or {devkit}{note}; "
                "it was published separately from the devkit (see `python scripts/prepare_data.py data=cars196 "
                "--info`)"
            ) from None

        paths, labels = [], []
        for half, annotations_path in (("cars_train", train_annotations), ("cars_test", test_annotations)):
            images = self._image_folder(folder, half)
            mat = load_mat(annotations_path, self.name)
            columns = struct_fields(mat, "annotations", ("fname", "class"), annotations_path, self.name)
            for i, (fname, cls) in enumerate(zip(columns["fname"], columns["class"], strict=True)):
                name = _string(fname, i, "fname", annotations_path, self.name)
                paths.append(self.listed_path(images, name, annotations_path, f"annotation {i + 1}"))
                labels.append(_scalar_int(cls, i, "class", annotations_path, self.name))
        names = class_names_of(load_mat(meta, self.name), meta, self.name)
        return self._records(paths, labels, names, meta)
