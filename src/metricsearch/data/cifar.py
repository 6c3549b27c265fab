"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images").

60,000 colour images of 32x32 pixels: 50,000 train and 10,000 test, in 10 classes (CIFAR-10, 6,000 images each) or
100 classes (CIFAR-100, 600 each). The "python version" archives hold pickles written by Python 2::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta (b"label_names")
    cifar-100-python/train, test, meta (b"fine_label_names", b"coarse_label_names")

Each data file is a dict with bytes keys: ``b"data"``, an N x 3072 uint8 array (the red plane, then green, then
blue, each 32x32 row-major), ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` / ``b"coarse_labels"`` (CIFAR-100),
and ``b"filenames"``. The fine labels are the classes used here.

Protocols (``protocol``):

- ``closed_set`` (default): the dataset's own split, train on the training files and evaluate on the test file;
  both have every class, so retrieval is measured on the classes trained on.
- ``zero_shot``: the metric-learning protocol of CUB/Cars/SOP: the first half of the classes (CIFAR-100: 0-49) train
  with all their images, training and test files together, and the other half (50-99) are the unseen test classes.

NOTE: the pickles are decoded ONCE into lossless 32x32 PNG files (``<dataset folder>/cifar10-png-v1/{train,test}/
<label>_<class name>/<index>.png``, written through :func:`~metricsearch.data.io.build_once`), and the dataset is
then read like every other: a list of image paths. Training, the uint8 fast-path cache, retrieval grids, the search
index and its web page all take image paths, so they work unchanged. The cost is paid once: 60,000 small files
(about 240 MB on disk) written in under a minute (25-50 s measured on a shared two-core machine); later loads read
the manifest (about 1.5 s). A changed pickle (another size or modification time, e.g. a fresh download) makes a
new set.

The pickles are untrusted input: a pickle can name any Python callable and have it called while loading (e.g.
``os.system``). They are read with :class:`CIFARUnpickler`, which resolves only the three numpy names that a
numpy array pickle needs and refuses every other global, after checking that the file is no larger than any
CIFAR file.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
from PIL import Image

from metricsearch.data.disk_source import DiskSource, SplitCounts
from metricsearch.data.io import build_once
from metricsearch.data.records import CLOSED_SET, ZERO_SHOT, DatasetError, DatasetSplit, ImageRecords
from metricsearch.utils.config import ConfigError

log = logging.getLogger(__name__)

# Part of the image folder's name and manifest: bump it whenever the decoding or the file names change.
FORMAT_VERSION = 1
IMAGE_SIDE = 32
PIXELS_PER_IMAGE = 3 * IMAGE_SIDE * IMAGE_SIDE
# The largest real file, CIFAR-100's train, is 161 MB; anything much larger is not a CIFAR file (and is refused
# before unpickling builds it in memory).
MAX_PICKLE_BYTES = 256 * 1024 * 1024
PROTOCOLS = (CLOSED_SET, ZERO_SHOT)

# How a numpy array pickles (under numpy 1.x, which wrote the real files, and numpy 2.x, whose module is _core).
_RECONSTRUCT = np.ndarray((0,), dtype=np.uint8).__reduce__()[0]
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle names a Python object that no CIFAR file names (it may be malicious)."""


class CIFARUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR files and nothing that could run code: only :data:`ALLOWED_GLOBALS` resolve.

    Everything else in the files (dicts, lists, ints, byte strings) needs no global. Python 2's strings come back
    as bytes (``encoding="bytes"``), as the dataset's own loading instructions say.
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(f"{module}.{name}") from None


def read_cifar_pickle(path: Path, *, dataset: str, fix: str) -> dict[bytes, Any]:
    """The dict stored in one CIFAR pickle, read with :class:`CIFARUnpickler`.

    Args:
        path: The file.
        dataset: Dataset name for messages.
        fix: What to do about a bad file, appended to messages.

    Raises:
        DatasetError: The file is too large, truncated, not a pickle, names a forbidden global, or holds no dict.
    """
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise DatasetError(
            f"{dataset}: {path} is {size:,} bytes, larger than any CIFAR file ({MAX_PICKLE_BYTES:,} at most); {fix}"
        )
    with open(path, "rb") as f:
        try:
            content = CIFARUnpickler(f).load()
        except ForbiddenGlobalError as exc:
            raise DatasetError(
                f"{dataset}: {path} refers to {exc}, which no CIFAR file does; refusing to load it (a tampered or "
                f"foreign pickle); {fix}"
            ) from None
        except Exception as exc:  # pickle and numpy raise many types for damaged input
            raise DatasetError(
                f"{dataset}: {path} is truncated or not a CIFAR pickle ({type(exc).__name__}: {exc}); {fix}"
            ) from exc
    if not isinstance(content, dict):
        raise DatasetError(f"{dataset}: {path} holds a {type(content).__name__}, not a CIFAR dict; {fix}")
    return content


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {' x '.join(map(str, value.shape)) or 'scalar'} {value.dtype} array"
    return "nothing" if value is None else f"a {type(value).__name__}"


def folder_name(label: int, name: str, num_classes: int) -> str:
    """The folder of a class's PNGs, e.g. ``0_airplane`` or ``07_beetle``; the name is reduced to safe characters."""
    safe = re.sub(r"[^0-9A-Za-z_.-]+", "_", name) or "class"
    return f"{label:0{len(str(num_classes - 1))}d}_{safe}"


@dataclass
class CIFARSource(DiskSource):
    """Base of the two CIFAR readers: reads the pickles, writes them once as PNG files, splits by ``protocol``.

    Attributes:
        protocol: ``closed_set`` (the dataset's own train / test files, same classes) or ``zero_shot`` (first half
            of the classes train, second half test, each with all its images).
        image_dir: Where the PNG folder is written; default: the dataset folder (the one holding the pickles).
    """

    protocol: str = CLOSED_SET
    image_dir: str | Path | None = None

    downloadable: ClassVar[bool] = True
    num_classes: ClassVar[int] = 0
    archive: ClassVar[str] = ""
    train_files: ClassVar[tuple[str, ...]] = ()
    test_files: ClassVar[tuple[str, ...]] = ()
    meta_file: ClassVar[str] = ""
    labels_key: ClassVar[bytes] = b""
    names_key: ClassVar[bytes] = b""
    train_images: ClassVar[int] = 50000
    test_images: ClassVar[int] = 10000

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"data.source.protocol={self.protocol!r} is not a {self.name} protocol; "
                f"set one of {', '.join(PROTOCOLS)}"
            )

    @property
    def expected(self) -> SplitCounts:  # type: ignore[override]
        """The complete dataset's counts under this protocol."""
        if self.protocol == ZERO_SHOT:
            half_images = (self.train_images + self.test_images) // 2
            return SplitCounts(half_images, half_images, self.num_classes // 2, self.num_classes // 2)
        return SplitCounts(self.train_images, self.test_images, self.num_classes, self.num_classes)

    @property
    def train_description(self) -> str:  # type: ignore[override]
        if self.protocol == ZERO_SHOT:
            return f"classes 0-{self.num_classes // 2 - 1}"
        return ", ".join(self.train_files)

    @property
    def test_description(self) -> str:  # type: ignore[override]
        if self.protocol == ZERO_SHOT:
            return f"classes {self.num_classes // 2}-{self.num_classes - 1}"
        return ", ".join(self.test_files)

    @property
    def fix(self) -> str:
        return f"extract {self.archive} again, or run `python scripts/prepare_data.py data={self.option}`"

    def image_folder(self, dataset_dir: Path) -> Path:
        """The folder the PNGs are written to (a dedicated one: an unfinished build of it is wiped)."""
        base = Path(self.image_dir).expanduser() if self.image_dir is not None else dataset_dir
        return base / f"{self.option}-png-v{FORMAT_VERSION}"

    def image_root(self, folder: Path) -> Path | None:
        """None: the PNGs are this reader's own build (possibly in ``image_dir``), not paths a file names."""
        return None

    def _read(self, folder: Path) -> tuple[DatasetSplit, str]:
        sources = [folder / name for name in (*self.train_files, *self.test_files, self.meta_file)]
        for path in sources:
            if not path.is_file():
                raise self.missing_file_error(path, "file")
        # A re-downloaded or replaced pickle (another size or time) makes a new set of PNGs.
        stats = {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in sources}
        params = {"format_version": FORMAT_VERSION, "dataset": self.option, "files": stats}
        images = self.image_folder(folder)
        manifest = build_once(images, params, lambda out: self._decode(folder, out))
        names = dict(enumerate(manifest["class_names"]))
        train = self._records(images, "train", manifest["train_labels"], names)
        test = self._records(images, "test", manifest["test_labels"], names)
        self._check_built(images, "train", train)
        self._check_built(images, "test", test)
        if self.protocol == ZERO_SHOT:
            every = ImageRecords([*train.paths, *test.paths], np.concatenate([train.labels, test.labels]), names)
            is_train = every.labels < self.num_classes // 2
            split = DatasetSplit(every.select(is_train), every.select(~is_train), protocol=ZERO_SHOT)
        else:
            split = DatasetSplit(train, test, protocol=CLOSED_SET)
        return split, f"{folder.name}, {self.protocol}"

    def _records(self, images: Path, side: str, labels: list[int], names: dict[int, str]) -> ImageRecords:
        """The PNGs of the training or test files, in their order in the pickles."""
        # NOTE: one path join per image (pathlib costs ~6 us a join: a third of a second for the 60,000 images).
        class_dirs = [images / side / folder_name(c, names[c], self.num_classes) for c in range(self.num_classes)]
        paths = [class_dirs[label] / f"{index:05d}.png" for index, label in enumerate(labels)]
        return ImageRecords(paths, np.asarray(labels, dtype=np.int64), names)

    def _check_built(self, images: Path, side: str, records: ImageRecords) -> None:
        """Fail with the fix if PNGs of the finished build have gone missing since (one listing per class folder)."""
        for label, count in enumerate(np.bincount(records.labels, minlength=self.num_classes)):
            folder = images / side / folder_name(label, records.class_names[label], self.num_classes)
            try:
                with os.scandir(folder) as entries:
                    found = sum(entry.name.endswith(".png") for entry in entries)
            except OSError:
                found = 0
            if found < count:
                raise DatasetError(
                    f"{self.name}: {folder} holds {found} of the {count} PNG files built there; delete {images} and "
                    "they will be built again"
                )

    def _class_names(self, path: Path) -> list[str]:
        content = read_cifar_pickle(path, dataset=self.name, fix=self.fix)
        names = content.get(self.names_key)
        if (
            not isinstance(names, list)
            or len(names) != self.num_classes
            or not all(isinstance(n, bytes | str) for n in names)
        ):
            raise DatasetError(
                f"{self.name}: {path} should list {self.num_classes} class names under {self.names_key!r}, "
                f"got {_describe(names) if not isinstance(names, list) else f'{len(names)} entries'}; {self.fix}"
            )
        return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]

    def read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """The images (N x 3072 uint8) and labels of one data file, checked.

        Raises:
            DatasetError: The file is damaged, of another shape or type, or its labels do not fit its images or
                the classes.
        """
        content = read_cifar_pickle(path, dataset=self.name, fix=self.fix)
        data, labels = content.get(b"data"), content.get(self.labels_key)
        if not (
            isinstance(data, np.ndarray)
            and data.dtype == np.uint8
            and data.ndim == 2
            and data.shape[1] == PIXELS_PER_IMAGE
        ):
            raise DatasetError(
                f"{self.name}: b'data' of {path} should be an N x {PIXELS_PER_IMAGE} uint8 array, got "
                f"{_describe(data)}; {self.fix}"
            )
        if not isinstance(labels, list | np.ndarray):
            raise DatasetError(f"{self.name}: {path} has no list of labels under {self.labels_key!r}; {self.fix}")
        try:
            labels = np.asarray(labels)
        except (ValueError, TypeError, RecursionError):  # ragged or deeply nested lists
            labels = None
        if labels is None or labels.shape != (len(data),) or (len(labels) and labels.dtype.kind not in "iu"):
            shape = "a ragged or nested list" if labels is None else _describe(labels)
            raise DatasetError(
                f"{self.name}: {path} has {shape} of labels under {self.labels_key!r} for its "
                f"{len(data):,} images (one integer each); {self.fix}"
            )
        outside = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(outside):
            raise DatasetError(
                f"{self.name}: {path} has label {int(outside[0])}, outside 0-{self.num_classes - 1} "
                f"({len(outside):,} such labels); {self.fix}"
            )
        return data, labels.astype(np.int64)

    def _decode(self, folder: Path, out: Path) -> dict[str, Any]:
        """Write every image of the pickles in ``folder`` as a PNG under ``out``; returns the manifest entries."""
        names = self._class_names(folder / self.meta_file)
        started = time.perf_counter()
        manifest: dict[str, Any] = {"class_names": names}
        for side, files in (("train", self.train_files), ("test", self.test_files)):
            class_dirs = [out / side / folder_name(c, names[c], self.num_classes) for c in range(self.num_classes)]
            for class_dir in class_dirs:
                class_dir.mkdir(parents=True)
            labels_of_side: list[int] = []
            for filename in files:
                data, labels = self.read_batch(folder / filename)
                log.info("%s: writing the %d images of %s as PNG files into %s", self.name, len(data), filename, out)
                # Planes R, G, B of 32 rows each -> rows x columns x channels.
                pixels = data.reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 3, 1)
                for image, label in zip(pixels, labels, strict=True):
                    path = class_dirs[label] / f"{len(labels_of_side):05d}.png"
                    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")
                    labels_of_side.append(int(label))
            manifest[f"{side}_labels"] = labels_of_side
        log.info("%s: decoded into %s in %.0f s", self.name, out, time.perf_counter() - started)
        return manifest


@dataclass
class CIFAR10Source(CIFARSource):
    """CIFAR-10 from its python-version pickles (10 classes, original labels 0-9)."""

    name: ClassVar[str] = "CIFAR-10"
    option: ClassVar[str] = "cifar10"
    num_classes: ClassVar[int] = 10
    archive: ClassVar[str] = "cifar-10-python.tar.gz"
    train_files: ClassVar[tuple[str, ...]] = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files: ClassVar[tuple[str, ...]] = ("test_batch",)
    meta_file: ClassVar[str] = "batches.meta"
    labels_key: ClassVar[bytes] = b"labels"
    names_key: ClassVar[bytes] = b"label_names"
    markers: ClassVar[tuple[str, ...]] = ("batches.meta", "data_batch_1")
    nested: ClassVar[tuple[str, ...]] = ("cifar-10-batches-py",)
    layout_help: ClassVar[str] = (
        "data_batch_1 ... data_batch_5, test_batch and batches.meta in the data root "
        "(the cifar-10-batches-py folder of cifar-10-python.tar.gz)"
    )


@dataclass
class CIFAR100Source(CIFARSource):
    """CIFAR-100 from its python-version pickles (100 fine classes, original labels 0-99)."""

    name: ClassVar[str] = "CIFAR-100"
    option: ClassVar[str] = "cifar100"
    num_classes: ClassVar[int] = 100
    archive: ClassVar[str] = "cifar-100-python.tar.gz"
    train_files: ClassVar[tuple[str, ...]] = ("train",)
    test_files: ClassVar[tuple[str, ...]] = ("test",)
    meta_file: ClassVar[str] = "meta"
    labels_key: ClassVar[bytes] = b"fine_labels"
    names_key: ClassVar[bytes] = b"fine_label_names"
    markers: ClassVar[tuple[str, ...]] = ("meta",)
    nested: ClassVar[tuple[str, ...]] = ("cifar-100-python",)
    layout_help: ClassVar[str] = (
        "train, test and meta in the data root (the cifar-100-python folder of cifar-100-python.tar.gz)"
    )
