"""CIFAR-10 / CIFAR-100 from their python pickles: counts, labels, pixel order, class names, protocols, each kind of
bad or hostile file named, the PNGs written once, check_data / prepare_data, and a batch from the composed config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from metricsearch.cli.data import main_check_data as check_data
from metricsearch.cli.data import main_prepare_data as prepare_data
from metricsearch.data import cifar
from metricsearch.data.cifar import CIFAR10Source, CIFAR100Source
from metricsearch.data.disk_source import SplitCounts
from metricsearch.data.download import DISTRIBUTIONS, DownloadError, prepare_dataset
from metricsearch.data.io import MANIFEST_NAME
from metricsearch.data.records import CLOSED_SET, ZERO_SHOT, DatasetError
from metricsearch.utils.config import ConfigError
from tests.cifar_fixtures import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    dump_python2_pickle,
    make_cifar10,
    make_cifar100,
    make_cifar_archive,
)
from tests.helpers import compose_config

FIX = "extract cifar-10-python.tar.gz again, or run `python scripts/prepare_data.py data=cifar10`"


@pytest.fixture(scope="session")
def cifar10_copy(tmp_path_factory) -> tuple[Path, SplitCounts]:
    root = tmp_path_factory.mktemp("cifar10_copy") / "cifar-10-batches-py"
    return root, make_cifar10(root, per_class_train=4, per_class_test=2)


@pytest.fixture(scope="session")
def cifar100_copy(tmp_path_factory) -> tuple[Path, SplitCounts]:
    root = tmp_path_factory.mktemp("cifar100_copy") / "cifar-100-python"
    return root, make_cifar100(root, per_class_train=2, per_class_test=1)


def _unpickle_trusted(path: Path) -> dict:
    """A file this test module wrote itself, read as the dataset's page says (never done on downloaded files)."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
        return np.asarray(image)


# --- reading ---


def test_cifar10_closed_set_counts_labels_and_class_names(cifar10_copy):
    root, expected = cifar10_copy
    source = CIFAR10Source(root)
    split = source.load()
    assert split.protocol == CLOSED_SET and split.gallery is None
    assert SplitCounts.of(split) == expected == SplitCounts(40, 20, 10, 10)
    batches = [_unpickle_trusted(root / f"data_batch_{i}") for i in range(1, 6)]
    assert split.train.labels.tolist() == [label for batch in batches for label in batch[b"labels"]]
    assert split.test.labels.tolist() == _unpickle_trusted(root / "test_batch")[b"labels"]
    assert split.train.class_names == dict(enumerate(CIFAR10_CLASSES))
    label = split.train.labels[0]
    assert split.train.paths[0] == root / "cifar10-png-v1" / "train" / f"{label}_{CIFAR10_CLASSES[label]}" / "00000.png"
    assert split.test.paths[-1].name == "00019.png" and split.test.paths[-1].parent.parent.name == "test"
    assert source.count_mismatch is not None and "not the complete dataset" in source.count_mismatch
    assert source.expected == SplitCounts(50000, 10000, 10, 10)


def test_every_image_is_decoded_losslessly_in_plane_order(cifar10_copy):
    root, _ = cifar10_copy
    split = CIFAR10Source(root).load()
    rows = np.concatenate([_unpickle_trusted(root / f"data_batch_{i}")[b"data"] for i in range(1, 6)])
    for index in (0, 17, 39):
        planes = rows[index].reshape(3, 32, 32)  # R, G, B, each 32 rows of 32
        assert np.array_equal(_png_pixels(split.train.paths[index]), np.stack(planes, axis=-1))


def test_a_pixel_set_in_one_plane_comes_out_at_its_place(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    make_cifar10(root, per_class_train=1, per_class_test=1)
    data = np.zeros((10, 3072), dtype=np.uint8)
    data[0, 0 * 1024 + 3 * 32 + 5] = 200  # red plane, row 3, column 5
    data[0, 1 * 1024 + 7 * 32 + 1] = 100  # green plane, row 7, column 1
    data[0, 2 * 1024 + 0 * 32 + 31] = 50  # blue plane, row 0, column 31
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": list(range(10)), b"data": data, b"filenames": []}
    dump_python2_pickle(batch, root / "test_batch")
    pixels = _png_pixels(CIFAR10Source(root).load().test.paths[0])
    assert pixels[3, 5].tolist() == [200, 0, 0]
    assert pixels[7, 1].tolist() == [0, 100, 0]
    assert pixels[0, 31].tolist() == [0, 0, 50]
    assert int(pixels.astype(np.int64).sum()) == 350


def test_cifar100_closed_set_and_zero_shot(cifar100_copy):
    root, expected = cifar100_copy
    closed = CIFAR100Source(root).load()
    assert SplitCounts.of(closed) == expected == SplitCounts(200, 100, 100, 100)
    assert closed.train.labels.tolist() == _unpickle_trusted(root / "train")[b"fine_labels"]
    assert closed.train.class_names[0] == "apple" and closed.train.class_names[99] == "worm"
    label = closed.train.labels[0]
    assert closed.train.paths[0].parent.name == f"{label:02d}_{CIFAR100_CLASSES[label]}"

    source = CIFAR100Source(root, protocol="zero_shot")
    zero_shot = source.load()
    assert zero_shot.protocol == ZERO_SHOT
    # Classes 0-49 with their training and test images; 50-99 likewise; nothing is left out.
    assert SplitCounts.of(zero_shot) == SplitCounts(150, 150, 50, 50)
    assert zero_shot.train.classes.tolist() == list(range(50))
    assert zero_shot.test.classes.tolist() == list(range(50, 100))
    every = set(closed.train.paths) | set(closed.test.paths)
    assert set(zero_shot.train.paths) | set(zero_shot.test.paths) == every
    assert sum(p.parent.parent.name == "test" for p in zero_shot.train.paths) == 50  # one test image per class
    assert source.expected == SplitCounts(30000, 30000, 50, 50)
    # The same PNGs serve both protocols.
    assert zero_shot.train.paths[0].parent.parent.parent == closed.train.paths[0].parent.parent.parent


def test_the_archive_folder_is_found_inside_the_data_root(cifar10_copy):
    root, expected = cifar10_copy
    source = CIFAR10Source(root.parent)
    assert SplitCounts.of(source.load()) == expected and source.dataset_dir == root


def test_unknown_protocol_is_refused():
    with pytest.raises(ConfigError, match=r"protocol='query_gallery' is not a CIFAR-100 protocol; set one of closed"):
        CIFAR100Source("/nowhere", protocol="query_gallery")


def test_png_folder_can_live_elsewhere(cifar100_copy, tmp_path):
    split = CIFAR100Source(cifar100_copy[0], image_dir=tmp_path / "pngs").load()
    assert split.test.paths[0].is_relative_to(tmp_path / "pngs" / "cifar100-png-v1")


# --- the PNGs are written once ---


def test_images_are_written_once_and_again_when_a_pickle_changes(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    make_cifar10(root, per_class_train=1, per_class_test=1)
    paths = CIFAR10Source(root).load().train.paths
    manifest = root / "cifar10-png-v1" / MANIFEST_NAME
    written = {p: p.stat().st_mtime_ns for p in [*paths, manifest]}
    os.utime(paths[0], ns=(1, 1))  # a marker: a rewrite would give the file a new time
    again = CIFAR10Source(root).load().train.paths
    assert again == paths and paths[0].stat().st_mtime_ns == 1
    assert manifest.stat().st_mtime_ns == written[manifest]

    # A new test_batch (e.g. a fresh download): every PNG is written anew from it.
    batch = _unpickle_trusted(root / "test_batch")
    batch[b"data"] = np.full_like(batch[b"data"], 7)
    dump_python2_pickle(batch, root / "test_batch")
    split = CIFAR10Source(root).load()
    assert split.train.paths[0].stat().st_mtime_ns != 1
    assert np.all(_png_pixels(split.test.paths[3]) == 7)


def test_deleted_pngs_are_named_with_the_fix(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    make_cifar10(root, per_class_train=1, per_class_test=1)
    CIFAR10Source(root).load().test.paths[2].unlink()
    with pytest.raises(
        DatasetError,
        match=r"test/\d_\w+ holds 0 of the 1 PNG files built there; delete .*png-v1 and they will be built again",
    ):
        CIFAR10Source(root).load()


# --- bad files: one line naming the file and the fix ---


def _rewrite(path: Path, **changes) -> None:
    batch = _unpickle_trusted(path)
    batch.update({key.encode(): value for key, value in changes.items()})
    dump_python2_pickle(batch, path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated": (lambda r: _truncate(r / "data_batch_3"), r"data_batch_3 is truncated or not a CIFAR pickle"),
    "not a pickle": (lambda r: (r / "test_batch").write_text("<html>"), r"test_batch is truncated or not a CIFAR"),
    "wrong shape": (
        lambda r: _rewrite(r / "data_batch_2", data=np.zeros((2, 3000), np.uint8)),
        r"b'data' of .*data_batch_2 should be an N x 3072 uint8 array, got a 2 x 3000 uint8 array",
    ),
    "wrong type": (
        lambda r: _rewrite(r / "data_batch_2", data=np.zeros((2, 3072), np.int64)),
        r"should be an N x 3072 uint8 array, got a 2 x 3072 int64 array",
    ),
    "labels do not fit": (
        lambda r: _rewrite(r / "test_batch", labels=[0, 1, 2]),
        r"test_batch has a 3 int64 array of labels under b'labels' for its 10 images",
    ),
    "label outside the classes": (
        lambda r: _rewrite(r / "test_batch", labels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 10]),
        r"test_batch has label 10, outside 0-9",
    ),
    "missing file": (lambda r: (r / "data_batch_5").unlink(), r"file .*data_batch_5 is missing; expected layout"),
    "meta names": (
        lambda r: _rewrite(r / "batches.meta", label_names=[b"cat"] * 9),
        r"batches.meta should list 10 class names under b'label_names', got 9 entries",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_files_are_named_in_one_line_with_the_fix(damage, tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    make_cifar10(root, per_class_train=1, per_class_test=1)
    spoil, message = DAMAGE[damage]
    spoil(root)
    with pytest.raises(DatasetError, match=message) as caught:
        CIFAR10Source(root).load()
    assert "\n" not in str(caught.value)
    if damage != "missing file":
        assert str(caught.value).endswith(FIX)


class _Hostile:
    """Pickles as a call of os.system: what a malicious file would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_any_other_global_is_refused_without_running_it(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    make_cifar10(root, per_class_train=1, per_class_test=1)
    marker = tmp_path / "executed"
    dump_python2_pickle({b"data": _Hostile(marker), b"labels": []}, root / "data_batch_1")
    with pytest.raises(DatasetError, match=r"data_batch_1 refers to posix.system, which no CIFAR file does; refusing"):
        CIFAR10Source(root).load()
    assert not marker.exists()
    # What an unrestricted pickle.load would have done with the same file:
    _unpickle_trusted(root / "data_batch_1")
    assert marker.exists()


def test_a_file_larger_than_any_cifar_file_is_not_unpickled(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    make_cifar10(root, per_class_train=1, per_class_test=1)
    monkeypatch.setattr(cifar, "MAX_PICKLE_BYTES", 1000)  # the test files are a few kB; the real limit is 256 MB
    with pytest.raises(DatasetError, match=r"data_batch_1 is [0-9,]+ bytes, larger than any CIFAR file \(1,000 at"):
        CIFAR10Source(root).load()


# --- check_data / prepare_data ---


def test_check_data_prints_the_counts(cifar10_copy, cifar100_copy, capsys):
    root, expected = cifar10_copy
    assert check_data(["data=cifar10", f"data.root={root}", "--verify"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {k: summary[k] for k in expected.as_dict()} == expected.as_dict()
    assert summary["expected"] == SplitCounts(50000, 10000, 10, 10).as_dict()
    assert (summary["matches_expected"], summary["images_verified"], summary["protocol"]) == (False, True, CLOSED_SET)
    assert summary["layout"] == "cifar-10-batches-py, closed_set"

    root = cifar100_copy[0]
    assert check_data(["data=cifar100", f"data.root={root}", "data.source.protocol=zero_shot"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["train_images"], summary["test_classes"], summary["protocol"]) == (150, 50, ZERO_SHOT)
    assert summary["expected"] == SplitCounts(30000, 30000, 50, 50).as_dict()
    assert check_data(["data=cifar100", f"data.root={root}", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected train 50,000 images / 100 classes" in err[0]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.mark.parametrize(
    ("option", "make", "folder"),
    [("cifar10", make_cifar10, "cifar-10-batches-py"), ("cifar100", make_cifar100, "cifar-100-python")],
)
def test_prepare_dataset_checks_the_md5_and_unpacks_the_archive(option, make, folder, tmp_path):
    expected = make(tmp_path / "src" / folder, per_class_train=1, per_class_test=1)
    real = DISTRIBUTIONS[option]
    archive = make_cifar_archive(tmp_path / "src" / folder, tmp_path / "served" / real.variants[0][0].filename)
    # The catalogue's entry, with the fabricated archive's source and checksum in place of the published ones.
    remote = dataclasses.replace(real.variants[0][0], urls=(archive.as_uri(),), md5=_md5(archive))
    dist = dataclasses.replace(real, variants=((remote,),))
    source_class = CIFAR10Source if option == "cifar10" else CIFAR100Source

    corrupted = tmp_path / "corrupted" / archive.name
    corrupted.parent.mkdir()
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    bad = dataclasses.replace(dist, variants=((dataclasses.replace(remote, urls=(corrupted.as_uri(),)),),))
    target = tmp_path / "data" / folder
    with pytest.raises(DownloadError, match=rf"MD5 [0-9a-f]{{32}} does not match the published {remote.md5}"):
        prepare_dataset(source_class(target), bad, progress=False)
    assert not target.exists() and not any((tmp_path / "data" / "downloads").iterdir())

    summary = prepare_dataset(source_class(target), dist, progress=False)
    assert summary["status"] == "downloaded"
    assert {k: summary[k] for k in expected.as_dict()} == expected.as_dict()
    assert (target / source_class.meta_file).is_file() and (target / f"{option}-png-v1" / MANIFEST_NAME).is_file()
    assert prepare_dataset(source_class(target), dist, progress=False)["status"] == "already prepared"


def test_prepare_data_checks_the_published_md5(tmp_path, capsys):
    make_cifar10(tmp_path / "src" / "cifar-10-batches-py", per_class_train=1, per_class_test=1)
    served = tmp_path / "mirror"
    make_cifar_archive(tmp_path / "src" / "cifar-10-batches-py", served / "cifar-10-python.tar.gz")
    root = tmp_path / "data" / "cifar-10-batches-py"
    assert prepare_data(["data=cifar10", f"data.root={root}", "--mirror", served.as_uri()]) == 1
    captured = capsys.readouterr()
    assert "does not match the published c58f30108f718f92721af3b95e74349a" in captured.err
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in captured.out
    assert "train 50,000 images / 10 classes" in captured.out and not root.exists()
    assert prepare_data(["data=cifar100", "--info"]) == 0
    out = capsys.readouterr().out
    assert "cifar-100-python.tar.gz (md5 eb9058c3a382ffc7106e4002c42a8d85)" in out and "/meta" in out


# --- configs ---


@pytest.mark.parametrize(("option", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_data_configs(option, folder, tmp_path):
    cfg = compose_config([f"data={option}"], tmp_path, tmp_path, tiny=False)
    assert (cfg.data.image_size, cfg.data.resize_size, cfg.data.hflip) == (32, 32, True)
    assert list(cfg.data.recall_at_k) == [1, 2, 4, 8] and cfg.data.val_fraction == 0.1
    assert cfg.data.source.protocol == CLOSED_SET and Path(cfg.data.source.root) == tmp_path / folder
    # The batch fills with the default m=4 images per class from the classes left after validation.
    assert cfg.data.batch_size % cfg.sampler.m == 0 and cfg.data.batch_size // cfg.sampler.m <= (
        10 if option == "cifar10" else 100
    )


@pytest.mark.parametrize("cache", [None, "uint8"])
def test_composed_config_yields_a_training_batch(cifar10_copy, cache, tmp_path):
    overrides = [
        "data=cifar10",
        f"data.source.root={cifar10_copy[0]}",
        "data.batch_size=8",
        "sampler.m=2",
        "data.num_workers=0",
        f"data.cache={cache or 'null'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = compose_config(overrides, tmp_path, tmp_path, tiny=False)
    datamodule = instantiate(cfg.data, sampler=instantiate(cfg.sampler))
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].dtype.is_floating_point is (cache is None)  # the fast path augments after the transfer
    batch = datamodule.on_after_batch_transfer(batch, 0)
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype.is_floating_point
    assert np.all(np.bincount(batch["label"].numpy()) % 2 == 0)
    assert len(datamodule.split.test) == 20


def test_composed_zero_shot_config(cifar100_copy, tmp_path):
    overrides = ["data=cifar100", f"data.root={cifar100_copy[0]}", "data.source.protocol=zero_shot"]
    cfg = compose_config(overrides, tmp_path, tmp_path, tiny=False)
    split = instantiate(cfg.data.source).load()
    assert split.protocol == ZERO_SHOT and len(split.test.classes) == 50
