"""Bad data: an empty split, a missing, corrupt or very thin image, a list or link naming files outside the data root,
and CIFAR labels that are no list of integers stop with a message that names the problem (or are skipped with a
warning), and leave the dataset and every earlier output as they were.

Start-up checks run through the real assembly of a training run (``build_run``, what ``train.py`` calls); the
decoding path runs through the datamodule's loaders and, once, through ``train.py`` itself.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hydra.utils import instantiate
from PIL import Image

from metricsearch.cli.data import main_check_data as check_data
from metricsearch.cli.search import main_search
from metricsearch.data.cub import CUBSource
from metricsearch.data.folder import FolderSource
from metricsearch.data.inshop import InShopSource
from metricsearch.data.io import ImageLoadError, ImageTooLargeError, load_rgb_image
from metricsearch.data.records import DatasetError
from metricsearch.inference.model_loading import load_embedder
from metricsearch.inference.predict_embeddings import make_predict_trainer
from metricsearch.pipelines.index import build_index
from metricsearch.pipelines.train import build_run
from metricsearch.search.gallery import list_gallery_images
from tests.cifar_fixtures import dump_python2_pickle, make_cifar10
from tests.dataset_fixtures import (
    cub_folder_name,
    make_cars_flat,
    make_cub,
    make_folder,
    make_sop,
    write_image,
    write_lines,
)
from tests.faults.snapshots import snapshot
from tests.helpers import compose_config, run_train
from tests.inshop_fixtures import make_inshop
from tests.search_fixtures import png_bomb

# Settings of a disk dataset read by build_run; the runs fail (or are inspected) before any training.
DISK_RUN = ["data.num_workers=0", "data.batch_size=8", "sampler.m=2", "data.image_size=16", "data.resize_size=16"]


@pytest.fixture
def synthetic_copy(tmp_path, data_dir) -> Path:
    """A private copy of the tiny built-in dataset, as a ``paths.data_dir`` for runs that damage it."""
    source = instantiate(compose_config([], tmp_path, data_dir).data.source)
    source.load()
    copy = tmp_path / "data"
    shutil.copytree(source.folder, copy / source.folder.name)
    return copy


def images_of(data_root: Path) -> Path:
    """The image folder of the synthetic dataset under ``data_root``."""
    (folder,) = data_root.glob("synthetic-*")
    return folder / "images"


# ---------------------------------------------------------------------------------------------------------------
# Empty split


def _folder_without_test_classes(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "images"
    make_folder(root / "train", num_classes=4, images_per_class=4)
    (root / "test").mkdir()
    return root, ["data=folder"]


def _folder_whose_class_fraction_leaves_no_test_class(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "images"
    make_folder(root, num_classes=4, images_per_class=4)
    return root, ["data=folder", "data.source.train_fraction=0.9"]


def _cub_with_only_its_training_classes(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "CUB_200_2011"
    make_cub(root, images_per_class=2, num_classes=100)
    return root, ["data=cub"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_folder_without_test_classes, r"image folder: .*/test has no class sub-folders"),
        (
            _folder_whose_class_fraction_leaves_no_test_class,
            r"train_fraction=0\.9 of 4 classes leaves 4 training and 0 test classes; both need at least one",
        ),
        (_cub_with_only_its_training_classes, r"CUB-200-2011: no test images \(classes 101-200\) in .*CUB_200_2011"),
    ],
    ids=["folder-test-dir-empty", "folder-class-filter-empty", "cub-test-classes-absent"],
)
def test_empty_split_stops_the_run_at_start_up(make, message, tmp_path):
    root, overrides = make(tmp_path)
    before = snapshot(root)
    output = tmp_path / "run"
    cfg = compose_config([*overrides, f"data.source.root={root}", *DISK_RUN], output, tmp_path, tiny=False)
    with pytest.raises(DatasetError, match=message):
        build_run(cfg)
    assert snapshot(root) == before, "the dataset folder was changed"
    assert not output.exists(), "a run that never started wrote outputs"


# ---------------------------------------------------------------------------------------------------------------
# Missing image, found by the start-up checks


def test_missing_image_of_the_built_in_data_is_named_at_start_up(tmp_path, synthetic_copy):
    images = images_of(synthetic_copy)
    (images / "003" / "005.jpg").unlink()
    before = snapshot(synthetic_copy)
    with pytest.raises(
        DatasetError, match=r"1 of the 96 files built in .* are missing \(e\.g\. .*003/005\.jpg\)"
    ) as info:
        build_run(compose_config([], tmp_path / "run", synthetic_copy))
    assert "delete that folder and it will be built again" in str(info.value)
    # Refused, not silently regenerated: the 95 other images and the manifest are as they were.
    assert snapshot(synthetic_copy) == before


def test_missing_listed_image_of_a_dataset_copy_is_named_at_start_up(tmp_path):
    root = tmp_path / "CUB_200_2011"
    make_cub(root)
    (root / "images" / cub_folder_name(42) / "Bird_Number_42_0001_84.jpg").unlink()
    before = snapshot(root)
    cfg = compose_config(["data=cub", f"data.source.root={root}", *DISK_RUN], tmp_path / "run", tmp_path, tiny=False)
    with pytest.raises(DatasetError, match=r"1 of 400 listed images are missing, e\.g\. images/042\.Bird_number_42/"):
        build_run(cfg)
    assert snapshot(root) == before


# ---------------------------------------------------------------------------------------------------------------
# Missing and corrupt images met while decoding (after the start-up checks passed)


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG signature, then nonsense


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_delete, r"image file .*011/003\.jpg does not exist: remove or replace the file"),
        (_truncate, r"cannot read image .*011/003\.jpg \(OSError: .*[Tt]runcated.*\): remove or replace the file"),
        (_garbage, r"cannot read image .*011/003\.jpg \(.*\): remove or replace the file"),
    ],
    ids=["missing", "truncated", "garbage"],
)
def test_bad_image_met_by_the_loader_is_named(damage, message, tmp_path, synthetic_copy):
    _, datamodule = build_run(compose_config([], tmp_path / "run", synthetic_copy))  # start-up checks pass
    broken = images_of(synthetic_copy) / "011" / "003.jpg"
    damage(broken)
    before = snapshot(synthetic_copy)
    with pytest.raises(ImageLoadError, match=message):
        for _ in datamodule.test_dataloader():
            pass
    assert snapshot(synthetic_copy) == before


def _train_into_a_corrupt_test_image(tmp_path: Path, data_root: Path) -> tuple[Path, Path, bytes]:
    """Truncates a test-class JPEG and runs train.py, which trains an epoch and then fails at the test evaluation.

    Checks the failure and that the checkpoint survived; returns the run folder, the broken file and its bytes.
    """
    broken = images_of(data_root) / "011" / "003.jpg"
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 2])
    run_dir = tmp_path / "run"
    result = run_train(["test_untrained=false"], run_dir, data_root)
    assert result.returncode != 0
    assert f"cannot read image {broken}" in result.stderr and "remove or replace the file" in result.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # the epoch trained before the test evaluation is all there
    assert not (run_dir / "metrics.json").exists(), "a failed run wrote final metrics"
    return run_dir, broken, good


def test_corrupt_test_image_stops_train_py_and_the_trained_checkpoint_survives(tmp_path, synthetic_copy):
    run_dir, _, _ = _train_into_a_corrupt_test_image(tmp_path, synthetic_copy)
    embedder = load_embedder(ckpt=run_dir / "checkpoints" / "last.ckpt")  # a complete, usable model
    assert embedder.embedding_dim == 16


@pytest.mark.slow
def test_after_a_corrupt_image_is_replaced_resume_evaluates_without_training_again(tmp_path, synthetic_copy):
    run_dir, broken, good = _train_into_a_corrupt_test_image(tmp_path, synthetic_copy)
    broken.write_bytes(good)
    resumed = run_train(["resume=auto", "test_untrained=false"], run_dir, synthetic_copy)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == 2, "the resumed run trained again instead of reusing the checkpoint"
    assert 0.0 <= summary["metrics"]["test"]["recall@1"] <= 1.0


# ---------------------------------------------------------------------------------------------------------------
# Missing and corrupt gallery images while building an index


def test_gallery_images_gone_or_corrupt_are_left_out_of_the_index_by_name(tiny, tmp_path, caplog):
    gallery = tmp_path / "gallery"
    for label in ("000", "001"):
        shutil.copytree(tiny.gallery / label, gallery / label)
    paths, labels = list_gallery_images(gallery)  # listed first, as a long build does, then the files change
    (gallery / "000" / "004.jpg").unlink()
    _truncate(gallery / "001" / "002.jpg")
    embedder = load_embedder(ckpt=tiny.ckpt)
    trainer = make_predict_trainer(progress_bar=False)
    index = build_index(embedder, gallery, tmp_path / "index", paths=paths, labels=labels, trainer=trainer)
    assert len(index) == 14 and "000/004.jpg" not in index and "001/002.jpg" not in index
    assert "000/004.jpg does not exist" in caplog.text and "001/002.jpg (OSError" in caplog.text
    assert "Left 2 unreadable images out of the index" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Paths that lead out of the data root: named by a dataset's lists, or reached through a symbolic link


def _secret_image(tmp_path: Path) -> Path:
    """An image outside every data root, which no reader may read."""
    return write_image(tmp_path / "secret" / "abs.jpg", seed=999)


def _relist_cub(root: Path, name: str) -> str:
    make_cub(root, images_per_class=1, num_classes=4)
    lines = (root / "images.txt").read_text().splitlines()
    lines[0] = f"1 {name}"
    write_lines(root / "images.txt", lines)
    return "images.txt line 1"


def _relist_sop(root: Path, name: str) -> str:
    make_sop(root, classes_per_side=2)
    lines = (root / "Ebay_train.txt").read_text().splitlines()
    image_id, class_id, super_class, _ = lines[1].split()
    lines[1] = f"{image_id} {class_id} {super_class} {name}"
    write_lines(root / "Ebay_train.txt", lines)
    return "Ebay_train.txt line 2"


def _relist_inshop(root: Path, name: str) -> str:
    make_inshop(root, train_items=2, test_items=2, images_per_item=3)
    partition = root / "Eval" / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    _, item, status = lines[2].split()
    lines[2] = f"{name} {item} {status}"
    write_lines(partition, lines)
    return "list_eval_partition.txt line 3"


def _relist_cars(root: Path, name: str) -> str:
    make_cars_flat(root, images_per_class=1)
    mat = scipy.io.loadmat(root / "cars_annos.mat")
    mat["annotations"][0, 0]["relative_im_path"] = np.array([name])
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": mat["annotations"], "class_names": mat["class_names"]})
    return "cars_annos.mat annotation 1"


# Each reader, the folder its listed names are relative to, and the data= option.
LISTING_READERS = {
    "cub": (_relist_cub, lambda root: root / "images"),
    "sop": (_relist_sop, lambda root: root),
    "inshop": (_relist_inshop, lambda root: root),
    "cars196": (_relist_cars, lambda root: root),
}


@pytest.mark.parametrize("spelling", ["climbing", "absolute"])
@pytest.mark.parametrize("option", list(LISTING_READERS))
def test_a_dataset_list_naming_a_file_outside_the_data_root_is_refused_with_its_line(
    option, spelling, tmp_path, capsys
):
    secret = _secret_image(tmp_path)
    root = tmp_path / "copy"
    relist, base = LISTING_READERS[option]
    name = os.path.relpath(secret, base(root)) if spelling == "climbing" else str(secret)
    where = relist(root, name)
    reason = "it climbs out of its folder with '..'" if spelling == "climbing" else "it is an absolute path"
    before = snapshot(root)
    # check_data, the start-up check every training and evaluation runs: one line, status 2, nothing read.
    assert check_data([f"data={option}", f"data.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert f"{where}: the image path {name!r} is refused ({reason})" in err
    assert snapshot(root) == before


def test_inshop_finds_a_file_listed_twice_under_two_spellings(tmp_path):
    root = tmp_path / "inshop"
    make_inshop(root, train_items=2, test_items=2, images_per_item=3)
    partition = root / "Eval" / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    first, item, status = lines[2].split()
    lines[3] = f"{first.replace('img/', 'img/./', 1)} {item} {status}"
    write_lines(partition, lines)
    with pytest.raises(DatasetError, match=r"line 4: image img/\./.* is listed twice \(also on line 3\)"):
        InShopSource(root).load()


def test_a_listed_image_reached_through_a_link_out_of_the_data_root_is_refused(tmp_path):
    root = tmp_path / "CUB_200_2011"
    make_cub(root, images_per_class=1, num_classes=102)
    secret = _secret_image(tmp_path)
    listed = root / "images" / cub_folder_name(2)
    for image in listed.iterdir():  # the class folder becomes a link to a folder elsewhere holding its files
        shutil.copy(secret, secret.parent / image.name)
    shutil.rmtree(listed)
    listed.symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(DatasetError, match=r"1 of 102 listed images lead outside the data root .* symbolic link"):
        CUBSource(root).load()
    listed.unlink()  # a single file linked out is refused alike
    listed.mkdir()
    (listed / "Bird_Number_2_0000_2.jpg").symlink_to(secret)
    with pytest.raises(DatasetError, match=r"e\.g\. images/002\.Bird_number_2/Bird_Number_2_0000_2\.jpg"):
        CUBSource(root).load()


def test_a_folder_dataset_skips_links_out_of_its_root_as_the_index_builder_does(tmp_path, caplog):
    root = tmp_path / "photos"
    make_folder(root, num_classes=3, images_per_class=2)
    secret = _secret_image(tmp_path)
    (root / "class_00" / "linked.jpg").symlink_to(secret)  # a file linked out
    (root / "class_99").symlink_to(secret.parent, target_is_directory=True)  # a class folder linked out
    (root / "class_01" / "inside.jpg").symlink_to(root / "class_02" / "img_0.jpg")  # a link within: fine
    split = FolderSource(root, train_fraction=0).load()
    read = {path.relative_to(root).as_posix() for path in split.test.paths}
    assert read == {f"class_0{c}/img_{k}.jpg" for c in range(3) for k in range(2)} | {"class_01/inside.jpg"}
    assert "class_99" not in split.test.class_names.values()
    assert "lead outside the data root" in caplog.text and "linked.jpg" in caplog.text and "class_99" in caplog.text
    # One rule: the images the index builder would take from the same folder are those the dataset reads.
    indexed, _ = list_gallery_images(root)
    assert set(indexed) == read


# ---------------------------------------------------------------------------------------------------------------
# Very thin images: refused from the header by the one decoder, before a pixel is decoded or resized

# What the decoder says of a 1 x 300,000 strip (a few hundred bytes of PNG).
THIN = r"is 1 x 300,000, an aspect ratio of 300,000\.0:1, over the limit of 20:1"


def test_a_thin_image_is_refused_from_its_header(tmp_path):
    # The strip's pixel data is cut short: only a decoder that looked at the header first refuses it for its shape.
    path = tmp_path / "thin.png"
    path.write_bytes(png_bomb(1, 300_000))
    with pytest.raises(ImageTooLargeError, match=THIN):
        load_rgb_image(path)
    path.write_bytes(png_bomb(300_000, 1))
    with pytest.raises(ImageTooLargeError, match=r"is 300,000 x 1, an aspect ratio"):
        load_rgb_image(path)
    Image.new("RGB", (40, 800)).save(path)  # 20:1 is still an image
    assert load_rgb_image(path).size == (40, 800)


def test_a_thin_image_met_by_the_training_loader_is_named(tmp_path, synthetic_copy):
    _, datamodule = build_run(compose_config([], tmp_path / "run", synthetic_copy))
    thin = images_of(synthetic_copy) / "011" / "003.jpg"
    thin.write_bytes(png_bomb(1, 300_000))
    with pytest.raises(ImageTooLargeError, match=THIN):
        for _ in datamodule.test_dataloader():
            pass


def test_a_thin_image_is_left_out_of_an_index_and_refused_as_a_query(tiny, tmp_path, caplog, capsys):
    gallery = tmp_path / "gallery"
    for label in ("000", "001"):
        shutil.copytree(tiny.gallery / label, gallery / label)
    (gallery / "001" / "thin.png").write_bytes(png_bomb(1, 300_000))
    index = build_index(
        load_embedder(ckpt=tiny.ckpt), gallery, tmp_path / "index", trainer=make_predict_trainer(progress_bar=False)
    )
    assert len(index) == 16 and "001/thin.png" not in index
    assert re.search(THIN, caplog.text)
    capsys.readouterr()
    query = gallery / "001" / "thin.png"
    assert main_search([f"index={tmp_path / 'index'}", f"query={query}", "grid=none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(THIN, err), err


# ---------------------------------------------------------------------------------------------------------------
# CIFAR labels that are no list of integers


@pytest.mark.parametrize("labels", ["ragged", "deep"])
def test_cifar_labels_ragged_or_deeply_nested_are_one_line(labels, tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    make_cifar10(root, per_class_train=1, per_class_test=1)
    batch = pickle.loads((root / "test_batch").read_bytes(), encoding="bytes")  # written just now by the fixture
    if labels == "ragged":
        batch[b"labels"] = [1, [2, 3], *batch[b"labels"][2:]]
    else:
        nested = [1]
        for _ in range(200):
            nested = [nested]
        batch[b"labels"] = [nested, *batch[b"labels"][1:]]
    dump_python2_pickle(batch, root / "test_batch")
    assert check_data(["data=cifar10", f"data.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CIFAR-10: ") and "\n" not in err, err
    assert "test_batch has a ragged or nested list of labels" in err


def test_a_data_root_that_is_itself_a_link_is_read_as_its_target(tmp_path):
    """The rule is about where a listed file leads from its root, not about how the root is reached: a copy kept on
    another disk and linked into data/ reads as it always did."""
    real = tmp_path / "disk" / "CUB_200_2011"
    make_cub(real, images_per_class=1, num_classes=102)
    linked = tmp_path / "data" / "CUB_200_2011"
    linked.parent.mkdir()
    linked.symlink_to(real, target_is_directory=True)
    split = CUBSource(linked).load()
    assert len(split.train) == 100 and len(split.test) == 2
