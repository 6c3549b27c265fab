"""Bad data: an empty split, a missing image and a corrupt image stop with a message that names the problem, and
leave the dataset and every earlier output as they were.

Start-up checks run through the real assembly of a training run (``build_run``, what ``train.py`` calls); the
decoding path runs through the datamodule's loaders and, once, through ``train.py`` itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from metricsearch.data.io import ImageLoadError
from metricsearch.data.records import DatasetError
from metricsearch.inference.model_loading import load_embedder
from metricsearch.inference.predict_embeddings import make_predict_trainer
from metricsearch.pipelines.index import build_index
from metricsearch.pipelines.train import build_run
from metricsearch.search.gallery import list_gallery_images
from tests.dataset_fixtures import cub_folder_name, make_cub, make_folder
from tests.faults.snapshots import snapshot
from tests.helpers import compose_config, run_train

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
