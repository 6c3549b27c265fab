"""What every reader of a dataset on disk shares: finding its folder, and refusing a copy that is not what it claims.

A reader (CUB, Cars196, SOP, a plain image folder) only parses its annotation format into a
:class:`~metricsearch.data.records.DatasetSplit`; :meth:`DiskSource.load` then runs the checks that make a
broken copy fail at start-up with a message naming the problem instead of minutes into training:

1. the data root exists (an archive's top folder inside it is found too);
2. both splits have images (and the gallery, for a query/gallery dataset such as In-Shop);
3. every listed image lies inside the dataset folder, symbolic links followed (a list naming an absolute path or
   climbing with ``..`` is refused by the reader itself, with its line; see :mod:`metricsearch.utils.paths`), and
   exists (one directory listing per folder, so 120k images take about a second);
4. optionally, every image decodes (``verify_images``; slow, so off by default and run once by
   ``scripts/check_data.py --verify``);
5. the counts match the complete published dataset. A mismatch is a WARNING by default, because miniature and
   partial copies are legitimate for debugging, and an error with ``strict=True``, for runs whose numbers will be
   compared with papers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from metricsearch.data.io import ImageLoadError, load_rgb_image
from metricsearch.data.records import DatasetError, DatasetSplit
from metricsearch.utils.paths import join_inside, relative_name_problem, split_inside

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitCounts:
    """Images and classes on each side of a dataset's split.

    Under the ``query_gallery`` protocol (In-Shop) ``test_images`` counts the queries, as ``DatasetSplit.test``
    holds them, ``gallery_images`` the gallery, and ``test_classes`` the classes of queries and gallery together;
    :meth:`as_dict` then reports ``query_images`` and ``gallery_images`` instead of ``test_images``. Build those
    with :meth:`query_gallery`.
    """

    train_images: int
    test_images: int
    train_classes: int
    test_classes: int
    gallery_images: int | None = None

    @classmethod
    def query_gallery(
        cls, train_images: int, query_images: int, gallery_images: int, train_classes: int, test_classes: int
    ) -> SplitCounts:
        """The counts of a query/gallery dataset, named as :meth:`as_dict` reports them."""
        return cls(train_images, query_images, train_classes, test_classes, gallery_images)

    @classmethod
    def of(cls, split: DatasetSplit) -> SplitCounts:
        if split.gallery is None:
            return cls(len(split.train), len(split.test), len(split.train.classes), len(split.test.classes))
        return cls.query_gallery(
            len(split.train),
            len(split.test),
            len(split.gallery),
            len(split.train.classes),
            len(split.evaluation.classes),
        )

    @property
    def is_query_gallery(self) -> bool:
        return self.gallery_images is not None

    def as_dict(self) -> dict[str, int]:
        if not self.is_query_gallery:
            return {
                "train_images": self.train_images,
                "test_images": self.test_images,
                "train_classes": self.train_classes,
                "test_classes": self.test_classes,
            }
        return {
            "train_images": self.train_images,
            "query_images": self.test_images,
            "gallery_images": int(self.gallery_images or 0),
            "train_classes": self.train_classes,
            "test_classes": self.test_classes,
        }

    def describe(self) -> str:
        """E.g. ``train 5,864 images / 100 classes, test 5,924 images / 100 classes``, or for In-Shop
        ``train 25,882 images / 3,997 classes, test 14,218 queries + 12,612 gallery images / 3,985 classes``."""
        train = f"train {self.train_images:,} images / {self.train_classes:,} classes"
        if not self.is_query_gallery:
            return f"{train}, test {self.test_images:,} images / {self.test_classes:,} classes"
        return (
            f"{train}, test {self.test_images:,} queries + {self.gallery_images:,} gallery images / "
            f"{self.test_classes:,} classes"
        )


@dataclass
class DiskSource:
    """Base of the dataset readers: subclasses implement :meth:`_read`; :meth:`load` adds the integrity checks.

    Attributes:
        root: The dataset folder (or the folder its archive was extracted into).
        verify_images: Decode every image in :meth:`load` and fail on the first unreadable one, instead of only
            checking that the files exist.
        strict: Refuse a copy whose counts differ from the complete dataset (default: log a warning).
        workers: Threads that decode images when ``verify_images`` is set; default: one per CPU core.
    """

    root: str | Path
    verify_images: bool = False
    strict: bool = False
    workers: int | None = None

    #: Human-readable dataset name used in every message.
    name: ClassVar[str] = "dataset"
    #: The ``data=...`` option that reads this dataset (for hints such as the prepare_data command).
    option: ClassVar[str] = ""
    #: Whether ``scripts/prepare_data.py`` can download it.
    downloadable: ClassVar[bool] = False
    #: Counts of the complete dataset under the standard split; None where there is no reference.
    expected: ClassVar[SplitCounts | None] = None
    #: Files or folders that identify the dataset folder, and names of the top folder its archive extracts to.
    markers: ClassVar[tuple[str, ...]] = ()
    nested: ClassVar[tuple[str, ...]] = ()
    #: Which classes make up each split, as said in messages.
    train_description: ClassVar[str] = "training classes"
    test_description: ClassVar[str] = "test classes"
    gallery_description: ClassVar[str] = "gallery images"
    #: One line describing the expected layout, appended to layout errors.
    layout_help: ClassVar[str] = ""
    #: Whether a copy without training images is valid (a folder of one's own photos, for evaluation only).
    train_optional: ClassVar[bool] = False

    # Filled in by load().
    layout: str | None = field(default=None, init=False)
    dataset_dir: Path | None = field(default=None, init=False)
    count_mismatch: str | None = field(default=None, init=False)
    images_verified: bool = field(default=False, init=False)
    _split: DatasetSplit | None = field(default=None, init=False, repr=False, compare=False)

    def load(self) -> DatasetSplit:
        """Parse the annotations, check the copy and return the split (cached after the first call).

        Raises:
            DatasetError: The root, an annotation file or an image is missing, the layout is not recognised,
                a split (or the gallery of a query/gallery dataset) is empty, or (with ``strict``) the counts
                differ from the complete dataset.
            ImageLoadError: With ``verify_images``, an image cannot be decoded.
        """
        if self._split is not None:
            return self._split
        folder = self.find_dataset_dir()
        split, layout = self._read(folder)
        sides = [(split.train, "training", self.train_description)]
        if split.gallery is None:
            sides.append((split.test, "test", self.test_description))
        else:
            sides.append((split.test, "query", self.test_description))
            sides.append((split.gallery, "gallery", self.gallery_description))
        for records, side, description in sides:
            if len(records) == 0 and not (records is split.train and self.train_optional):
                raise DatasetError(f"{self.name}: no {side} images ({description}) in {folder} ({layout} layout)")
        paths = listed_paths(split)
        image_root = self.image_root(folder)
        if image_root is not None:
            check_inside_root(paths, dataset=self.name, root=image_root)
        check_images_exist(paths, dataset=self.name, root=folder)
        if self.verify_images:
            verify_images(paths, root=folder, workers=self.workers)
            self.images_verified = True
        self.count_mismatch = check_counts(split, self.expected, dataset=self.name, root=folder, strict=self.strict)
        self.layout, self.dataset_dir, self._split = layout, folder, split
        return split

    def find_dataset_dir(self) -> Path:
        """``root`` itself, or the folder inside it that an archive extracted (e.g. ``root/CUB_200_2011``)."""
        root = Path(self.root).expanduser()
        if not root.exists():
            hint = f"`python scripts/prepare_data.py data={self.option}` fetches it, or " if self.downloadable else ""
            raise DatasetError(
                f"{self.name}: the data root {root} does not exist; {hint}point data.source.root at your copy"
            )
        if not root.is_dir():
            raise DatasetError(f"{self.name}: the data root {root} is a file, not a folder")
        if self.markers and not _has_any(root, self.markers):
            for name in self.nested:
                if _has_any(root / name, self.markers):
                    log.info("%s: using %s inside the data root", self.name, root / name)
                    return root / name
        return root

    def _read(self, folder: Path) -> tuple[DatasetSplit, str]:
        """Parse the dataset in ``folder``; returns the split and a short name of the layout found."""
        raise NotImplementedError

    def image_root(self, folder: Path) -> Path | None:
        """The folder every listed image must lie in (links followed): the dataset folder, whose files name them.

        None for a reader whose image paths are its own build (CIFAR's PNGs), not names read from a file.
        """
        return folder

    def listed_path(self, root: Path, name: str, source: Path, where: str) -> Path:
        """``root / name`` for an image path read from ``source`` (``where``: e.g. ``line 12``).

        Raises:
            DatasetError: ``name`` is empty, absolute or climbs out of ``root`` with ``..``.
        """
        problem = relative_name_problem(name)
        if problem:
            raise DatasetError(
                f"{self.name}: {source} {where}: the image path {name!r} is refused ({problem}); listed images "
                f"must lie inside {root}: fix or remove that line"
            )
        return join_inside(root, name)

    def missing_file_error(self, path: Path, what: str = "annotation file") -> DatasetError:
        """The error for a missing annotation file, with the layout this reader expects."""
        layout = f"; expected layout: {self.layout_help}" if self.layout_help else ""
        return DatasetError(f"{self.name}: {what} {path} is missing{layout}")

    def fresh(self) -> DiskSource:
        """A new, unloaded reader with the same settings (e.g. after the files on disk changed)."""
        return dataclasses.replace(self)


def listed_paths(split: DatasetSplit) -> list[Path]:
    """Every image a split lists: training, then test (or queries, then gallery)."""
    return [*split.train.paths, *split.evaluation.paths]


def _has_any(folder: Path, names: Iterable[str]) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in names)


def relative_to_root(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` where it lies inside it (short, recognisable messages), else in full."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def read_rows(path: Path, num_fields: int, *, dataset: str, columns: str) -> list[tuple[int, list[str]]]:
    """The non-blank lines of a whitespace-separated annotation file, split into exactly ``num_fields`` fields.

    The last field keeps any spaces inside it (it is a path in every format read here).

    Args:
        path: The text file.
        num_fields: Fields per line.
        dataset: Dataset name for messages.
        columns: What a line should hold, e.g. ``"<image_id> <path>"``, for messages.

    Returns:
        ``(line_number, fields)`` pairs, line numbers 1-based as an editor shows them.

    Raises:
        DatasetError: The file cannot be read as text or a line has too few fields.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{dataset}: {path} is not a text file ({exc}); re-download it") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=num_fields - 1)
        if len(fields) != num_fields:
            raise DatasetError(f"{dataset}: {path} line {number} should be '{columns}', got {line.strip()!r}")
        rows.append((number, fields))
    return rows


def parse_int(text: str, path: Path, line: int, *, dataset: str, what: str) -> int:
    """``int(text)``, or a :class:`DatasetError` naming the file, line and field."""
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{dataset}: {path} line {line}: {what} should be an integer, got {text!r}") from None


def find_missing_files(paths: Sequence[Path]) -> list[Path]:
    """The paths that are not existing files, in their original order.

    Each folder is listed once instead of one ``stat`` per file: on the 120k images of SOP this is the
    difference between about a second and a minute on a network file system. The comparison of names is exact,
    so ``x.JPG`` listed but ``x.jpg`` on disk counts as missing, as it would when opened on Linux.
    """
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        by_folder.setdefault(Path(path).parent, []).append(Path(path))
    missing: set[Path] = set()
    for folder, members in by_folder.items():
        try:
            with os.scandir(folder) as entries:
                present = {entry.name for entry in entries if entry.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing.update(p for p in members if p.name not in present)
    return [Path(p) for p in paths if Path(p) in missing]


def check_inside_root(paths: Sequence[Path], *, dataset: str, root: Path) -> None:
    """Raise a :class:`DatasetError` when listed images resolve outside ``root`` (through a symbolic link)."""
    _, outside = split_inside(root, paths)
    if outside:
        raise DatasetError(
            f"{dataset}: {len(outside):,} of {len(paths):,} listed images lead outside the data root {root} through "
            f"a symbolic link, e.g. {relative_to_root(paths[outside[0]], root)}; images are read only inside the "
            "data root: copy those files into it, or point data.root at the folder that holds them"
        )


def check_images_exist(paths: Sequence[Path], *, dataset: str, root: Path) -> None:
    """Raise a :class:`DatasetError` naming the first missing image and how many are missing."""
    missing = find_missing_files(paths)
    if missing:
        raise DatasetError(
            f"{dataset}: {len(missing):,} of {len(paths):,} listed images are missing, e.g. "
            f"{relative_to_root(missing[0], root)} under {root} (an incomplete download or extraction, or "
            "annotations that do not belong to these images)"
        )


def _decode_error(path: Path) -> str | None:
    try:
        load_rgb_image(path)
    except ImageLoadError as exc:
        return str(exc)
    return None


def verify_images(paths: Sequence[Path], *, root: Path | None = None, workers: int | None = None) -> None:
    """Decode every image completely; raise :class:`ImageLoadError` naming the first bad one in listing order.

    Decoding runs in threads (PIL releases the GIL while decoding), so it uses every core without the start-up
    cost of processes. All images are tried before failing, so the message can say how many are bad.
    """
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    bad: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, error in enumerate(pool.map(_decode_error, paths), start=1):
            if error is not None:
                bad.append(error)
            if done % 20000 == 0:
                log.info("decoded %d/%d images (%.0f s)", done, len(paths), time.perf_counter() - started)
    if bad:
        where = f" under {root}" if root is not None else ""
        raise ImageLoadError(f"{len(bad):,} of {len(paths):,} images{where} cannot be decoded; the first: {bad[0]}")
    log.info("all %d images decode (%.1f s)", len(paths), time.perf_counter() - started)


def check_counts(
    split: DatasetSplit, expected: SplitCounts | None, *, dataset: str, root: Path, strict: bool
) -> str | None:
    """Compare the split with the complete dataset.

    Returns:
        None when the counts match (or there is no reference), else the mismatch message, also logged as a
        warning.

    Raises:
        DatasetError: The counts differ and ``strict`` is set.
    """
    if expected is None:
        return None
    found = SplitCounts.of(split)
    if found == expected:
        return None
    message = (
        f"{dataset} in {root} is not the complete dataset: found {found.describe()}; "
        f"expected {expected.describe()} (a partial download, a miniature copy, or a mirror with other files)"
    )
    if strict:
        raise DatasetError(f"{message}; set data.source.strict=false to use it anyway")
    log.warning("%s; results will not be comparable with published numbers", message)
    return message


def summarize(source: Any, split: DatasetSplit) -> dict[str, Any]:
    """The facts ``scripts/check_data.py`` prints: protocol, counts found and expected, layout, whether images
    decoded (under ``query_gallery`` the counts are ``query_images`` and ``gallery_images`` instead of
    ``test_images``; see :class:`SplitCounts`)."""
    found = SplitCounts.of(split)
    expected = getattr(source, "expected", None)
    dataset_dir = getattr(source, "dataset_dir", None) or getattr(source, "root", None)
    return {
        "dataset": getattr(source, "name", type(source).__name__),
        "root": str(dataset_dir) if dataset_dir is not None else None,
        "layout": getattr(source, "layout", None),
        "protocol": split.protocol,
        **found.as_dict(),
        "expected": expected.as_dict() if expected is not None else None,
        "matches_expected": None if expected is None else found == expected,
        "images_verified": bool(getattr(source, "images_verified", False)),
    }
