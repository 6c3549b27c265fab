"""Weak supervision: training on given pairs (same / different) or triplets (anchor, positive, negative).

A tuples file is a CSV with a header row and image paths relative to the dataset's root::

    image1,image2,label            anchor,positive,negative
    birds/a.jpg,birds/b.jpg,same   birds/a.jpg,birds/b.jpg,cats/c.jpg
    birds/a.jpg,cats/c.jpg,different

It is someone else's file, so it is read defensively (:func:`read_tuples_file`): bounded in size, every path kept
inside the root, every image checked to exist, and the first problem reported as one line naming the file, the line
and the fix, before any data is generated or any model built. :class:`TupleDataset` then serves batches of whole
tuples: the distinct images of the batch, and each tuple as positions in it. No class label is read or returned.

:func:`sample_tuples` draws such a file from a labelled dataset (``scripts/make_tuples.py``), so that class, pair
and triplet supervision can be compared on the same images.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metricsearch.data.dataset import IMAGE, INDEX, Item, _split_items
from metricsearch.data.io import load_rgb_image
from metricsearch.data.records import DatasetError, ImageRecords
from metricsearch.data.transforms import TrainTransform

# Keys of a tuple batch (besides IMAGE and INDEX): each tuple as positions into the batch's images, (T, 2) or
# (T, 3); and, for pairs, whether the two images are the same kind of thing.
TUPLES = "tuples"
SAME = "same"
PAIRS, TRIPLETS = "pairs", "triplets"
HEADERS = {PAIRS: ("image1", "image2", "label"), TRIPLETS: ("anchor", "positive", "negative")}
PAIR_LABELS = {"same": True, "different": False}
# A tuples file is untrusted: its cost is bounded before it is parsed.
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_ROWS = 5_000_000


class TupleFileError(DatasetError):
    """A pairs or triplets file that cannot be trained on; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class TupleSet:
    """The tuples of a file: the distinct images it names, and each tuple as indices into them.

    Attributes:
        kind: ``pairs`` or ``triplets``.
        paths: each distinct image once, resolved, in order of first mention.
        tuples: (N, 2) or (N, 3) indices into ``paths``.
        same: for pairs, whether each pair is similar (N,); None for triplets.
        lines: the file's line number of each tuple (for messages).
        file: the file it was read from.
    """

    kind: str
    paths: list[Path]
    tuples: np.ndarray
    same: np.ndarray | None
    lines: np.ndarray
    file: Path

    def __len__(self) -> int:
        return len(self.tuples)

    @property
    def arity(self) -> int:
        return self.tuples.shape[1]


def dataset_root(source: object) -> Path:
    """The folder tuples files are relative to: the generated data's folder, else the source's ``root``."""
    root = getattr(source, "folder", None) or getattr(source, "root", None)
    if root is None:
        raise DatasetError(f"{type(source).__name__} has no root folder that a pairs or triplets file could name")
    return Path(root).expanduser().resolve()


def read_tuples_file(file: str | Path, kind: str, root: str | Path) -> TupleSet:
    """Reads and checks a pairs or triplets CSV against the images under ``root``.

    Raises:
        TupleFileError: the file is missing, too large or empty; a line has the wrong number of fields, an empty
            field, a label other than ``same`` / ``different``, an absolute path or one leaving ``root``, names an
            image that is not there, or names one image twice.
    """
    if kind not in HEADERS:
        raise ValueError(f"kind must be {PAIRS} or {TRIPLETS}, got {kind!r}")
    setting = f"data.{kind}_file={file}"
    header = ",".join(HEADERS[kind])
    file = Path(file).expanduser()
    root = Path(root).expanduser().resolve()
    if not file.is_file():
        raise TupleFileError(f"{setting}: no such file; give the path of a CSV whose first line is `{header}`")
    if file.stat().st_size > MAX_FILE_BYTES:
        raise TupleFileError(
            f"{setting}: {file.stat().st_size} bytes is over the {MAX_FILE_BYTES} accepted; split the file or sample "
            "fewer tuples"
        )
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise TupleFileError(f"{setting}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err
    rows = csv.reader(io.StringIO(text))
    first = next(rows, None)
    if first is None or not any(field.strip() for field in first):
        raise TupleFileError(
            f"{setting}: the file is empty; make its first line `{header}`, then add one {kind[:-1]} a line"
        )
    if tuple(field.strip().lower() for field in first) != HEADERS[kind]:
        raise TupleFileError(f"{setting} line 1: the header is `{','.join(first)}`; make the first line `{header}`")

    index_of: dict[Path, int] = {}
    tuples, same, lines = [], [], []
    checked: dict[str, Path] = {}
    width = len(HEADERS[kind])
    for line_number, row in enumerate(rows, start=2):
        if not row or not any(field.strip() for field in row):
            continue
        where = f"{setting} line {line_number}"
        if len(tuples) >= MAX_ROWS:
            raise TupleFileError(f"{where}: more than {MAX_ROWS} {kind}; sample fewer")
        if len(row) != width:
            raise TupleFileError(f"{where}: {len(row)} fields, expected {width} ({header}); fix the line")
        fields = [field.strip() for field in row]
        if not all(fields):
            raise TupleFileError(f"{where}: an empty field; every line needs {header}")
        names = fields[:2] if kind == PAIRS else fields
        if kind == PAIRS:
            label = fields[2].lower()
            if label not in PAIR_LABELS:
                raise TupleFileError(f"{where}: label `{fields[2]}` is not `same` or `different`; use one of those")
            same.append(PAIR_LABELS[label])
        resolved = []
        for name in names:
            if name not in checked:
                checked[name] = _resolve_image(name, root, where)
            resolved.append(checked[name])
        if len(set(resolved)) < len(resolved):
            raise TupleFileError(f"{where}: names the same image twice; a {kind[:-1]} needs distinct images")
        tuples.append([index_of.setdefault(path, len(index_of)) for path in resolved])
        lines.append(line_number)
    if not tuples:
        raise TupleFileError(f"{setting}: no {kind} after the header; add one {kind[:-1]} a line ({header})")
    return TupleSet(
        kind=kind,
        paths=list(index_of),
        tuples=np.asarray(tuples, dtype=np.int64),
        same=np.asarray(same, dtype=bool) if kind == PAIRS else None,
        lines=np.asarray(lines, dtype=np.int64),
        file=file,
    )


def _resolve_image(name: str, root: Path, where: str) -> Path:
    """The image ``name`` under ``root``, resolved (links followed), checked to stay inside it and to exist."""
    relative = Path(name)
    if relative.is_absolute() or relative.drive:
        raise TupleFileError(f"{where}: `{name}` is an absolute path; give it relative to the data root {root}")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise TupleFileError(f"{where}: `{name}` leaves the data root {root}; name images inside it")
    if not path.is_file():
        raise TupleFileError(f"{where}: image `{name}` does not exist under the data root {root}; fix the path")
    return path


def check_tuples_in(tuples: TupleSet, train_paths: Sequence[Path]) -> None:
    """Refuses a tuple that names an image outside the training split (a test image would leak into training).

    Raises:
        TupleFileError: naming the first such line.
    """
    train = {Path(p).resolve() for p in train_paths}
    outside = np.array([path not in train for path in tuples.paths])
    if not outside.any():
        return
    bad = np.flatnonzero(outside[tuples.tuples].any(axis=1))[0]
    image = next(tuples.paths[i] for i in tuples.tuples[bad] if outside[i])
    raise TupleFileError(
        f"data.{tuples.kind}_file={tuples.file} line {tuples.lines[bad]}: image {image} is not a training image of "
        "this dataset (a test image would be trained on); name training images only"
    )


class TupleDataset(torch.utils.data.Dataset):
    """Batches of whole tuples: the distinct images of the chosen tuples and each tuple as positions among them.

    An item is a list of ``(tuple index, seed)`` pairs (:class:`~metricsearch.data.samplers.SeededBatchSampler`);
    it returns ``{IMAGE, INDEX, TUPLES}`` (and ``SAME`` for pairs), where ``INDEX`` is each image's position in
    ``tuples.paths``. An image named by several tuples of a batch is loaded once, with one augmentation.
    """

    def __init__(self, tuples: TupleSet, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.tuples = tuples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        indices, seeds = _split_items(list(items))
        rows = self.tuples.tuples[indices]
        images, positions = np.unique(rows, return_inverse=True)
        # The seed of an image: the seed of the first tuple of the batch naming it, with the image's identity.
        first_tuple = np.full(len(images), -1)
        for row_position, image_position in enumerate(positions.reshape(rows.shape)):
            for position in image_position:
                if first_tuple[position] < 0:
                    first_tuple[position] = row_position
        loaded = []
        for image, row_position in zip(images, first_tuple, strict=True):
            seed = seeds[row_position]
            rng = None if seed is None else np.random.default_rng([seed, int(image)])
            picture = load_rgb_image(self.tuples.paths[image])
            loaded.append(
                self.transform(picture, rng) if isinstance(self.transform, TrainTransform) else self.transform(picture)
            )
        batch = {
            IMAGE: torch.stack(loaded),
            INDEX: torch.from_numpy(images.astype(np.int64)),
            TUPLES: torch.from_numpy(positions.reshape(rows.shape).astype(np.int64)),
        }
        if self.tuples.same is not None:
            batch[SAME] = torch.from_numpy(self.tuples.same[indices])
        return batch


def sample_tuples(records: ImageRecords, kind: str, count: int, seed: int, root: Path) -> list[tuple[str, ...]]:
    """Draws ``count`` distinct pairs (half same, half different) or triplets from labelled ``records``.

    Each tuple draws its class(es) uniformly among the classes with at least two images, then its images uniformly
    within them; duplicates are redrawn. Paths are written relative to ``root``.

    Raises:
        DatasetError: fewer than two classes with two images, or more tuples asked than can be told apart.
    """
    rng = np.random.default_rng(seed)
    labels = records.labels
    members = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    usable = np.array([c for c, m in members.items() if len(m) >= 2])
    if len(usable) < 2:
        raise DatasetError("sampling tuples needs at least two classes of two or more images")
    # An upper bound on the distinct tuples there are, so that the loop below always ends.
    possible = sum(len(m) * (len(m) - 1) for m in members.values()) * (len(labels) if kind == TRIPLETS else 1)
    if count > possible // 2:
        raise DatasetError(f"{count} distinct {kind} cannot be drawn from {len(labels)} images; ask for fewer")
    names = [path.resolve().relative_to(root).as_posix() for path in records.paths]
    chosen: dict[tuple[int, ...], tuple[str, ...]] = {}
    while len(chosen) < count:
        first, second = rng.choice(usable, size=2, replace=False)
        anchor, positive = rng.choice(members[int(first)], size=2, replace=False)
        negative = int(rng.choice(members[int(second)]))
        if kind == TRIPLETS:
            key = (int(anchor), int(positive), negative)
            chosen.setdefault(key, (names[anchor], names[positive], names[negative]))
        elif len(chosen) % 2 == 0:
            key = (int(min(anchor, positive)), int(max(anchor, positive)), 1)
            chosen.setdefault(key, (names[anchor], names[positive], "same"))
        else:
            key = (int(min(anchor, negative)), int(max(anchor, negative)), 0)
            chosen.setdefault(key, (names[anchor], names[negative], "different"))
    return list(chosen.values())


def format_tuples_csv(kind: str, rows: Sequence[tuple[str, ...]]) -> str:
    """The CSV text of a tuples file (header, then one tuple a line)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADERS[kind])
    writer.writerows(rows)
    return out.getvalue()
