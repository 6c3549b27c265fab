"""Miniature CIFAR-10 / CIFAR-100 copies in the exact format of the "python version" archives.

The real files were written by Python 2's ``cPickle.dump(batch, f, 2)``: protocol 2, every string a Python 2
``str`` (the SHORT_BINSTRING / BINSTRING opcodes, read back as bytes), and the numpy array pickled through
``numpy.core.multiarray._reconstruct``. :func:`dump_python2_pickle` writes exactly that, so the reader is tested on
what it will meet (Python 3's own protocol 2 would add ``_codecs.encode`` calls and numpy 2 ``numpy._core`` names).

Plain functions, so that any test module can import them and build the copies it needs.
"""

from __future__ import annotations

import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from metricsearch.data.disk_source import SplitCounts

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
    caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
    flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
    motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate
    poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
    squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
    wardrobe whale willow_tree wolf woman worm""".split()  # noqa: SIM905 (a hundred names read better as text)
)
CIFAR100_SUPERCLASSES = tuple(
    """aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices
    household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes
    large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees
    vehicles_1 vehicles_2""".split()  # noqa: SIM905
)
assert len(CIFAR100_CLASSES) == 100 and len(CIFAR100_SUPERCLASSES) == 20

_RECONSTRUCT = np.ndarray((0,), dtype=np.uint8).__reduce__()[0]


class _Python2Pickler(pickle._Pickler):
    """The pure-Python pickler, writing bytes as Python 2 ``str`` and numpy objects as numpy 1.x under Python 2."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, np.ascontiguousarray(obj).tobytes())
            return _RECONSTRUCT, (np.ndarray, (0,), b"b"), state
        if isinstance(obj, np.dtype):
            order, code = obj.str[0].encode(), obj.str[1:].encode()
            return np.dtype, (code, 0, 1), (3, order, None, None, None, -1, -1, 0)
        return NotImplemented


def dump_python2_pickle(obj: Any, path: Path) -> Path:
    """Write ``obj`` as Python 2's ``cPickle.dump(obj, f, 2)`` did (bytes for every string)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)
    return path


def random_images(count: int, seed: int) -> np.ndarray:
    """``count`` random CIFAR rows (N x 3072 uint8: R plane, G plane, B plane)."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, 3072), dtype=np.uint8)


def _labels(num_classes: int, per_class: int, seed: int) -> list[int]:
    """Each class ``per_class`` times, shuffled (the real files are not sorted by class)."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return [int(c) for c in np.random.default_rng(seed).permutation(labels)]


def _batch(label_key: str, labels: list[int], title: str, seed: int, **extra: Any) -> dict[bytes, Any]:
    return {
        b"batch_label": title.encode(),
        label_key.encode(): labels,
        b"data": random_images(len(labels), seed),
        b"filenames": [f"image_{seed}_{i:05d}.png".encode() for i in range(len(labels))],
        **{k.encode(): v for k, v in extra.items()},
    }


def make_cifar10(root: Path, per_class_train: int = 2, per_class_test: int = 1) -> SplitCounts:
    """A CIFAR-10 ``cifar-10-batches-py`` folder at ``root``: 10 classes, the training images dealt into 5 batches.

    Returns:
        The closed-set counts of the copy.
    """
    labels = _labels(10, per_class_train, seed=1)
    for number, part in enumerate(np.array_split(np.asarray(labels), 5), start=1):
        batch = _batch("labels", part.tolist(), f"training batch {number} of 5", seed=10 + number)
        dump_python2_pickle(batch, root / f"data_batch_{number}")
    test = _batch("labels", _labels(10, per_class_test, seed=2), "testing batch 1 of 1", seed=20)
    dump_python2_pickle(test, root / "test_batch")
    meta = {
        b"num_cases_per_batch": -(-len(labels) // 5),
        b"label_names": [name.encode() for name in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    dump_python2_pickle(meta, root / "batches.meta")
    return SplitCounts(10 * per_class_train, 10 * per_class_test, 10, 10)


def make_cifar100(root: Path, per_class_train: int = 2, per_class_test: int = 1) -> SplitCounts:
    """A CIFAR-100 ``cifar-100-python`` folder at ``root`` (train, test, meta).

    The coarse labels are ``fine // 5``, not the real superclass mapping: the reader does not use them.

    Returns:
        The closed-set counts of the copy.
    """
    for name, per_class, seed in (("train", per_class_train, 3), ("test", per_class_test, 4)):
        fine = _labels(100, per_class, seed)
        batch = _batch("fine_labels", fine, name, seed, coarse_labels=[c // 5 for c in fine])
        dump_python2_pickle(batch, root / name)
    meta = {
        b"fine_label_names": [name.encode() for name in CIFAR100_CLASSES],
        b"coarse_label_names": [name.encode() for name in CIFAR100_SUPERCLASSES],
    }
    dump_python2_pickle(meta, root / "meta")
    return SplitCounts(100 * per_class_train, 100 * per_class_test, 100, 100)


def make_cifar_archive(folder: Path, archive: Path) -> Path:
    """Pack a fabricated copy as its ``.tar.gz`` is packed: the folder itself as the archive's top folder."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive
