"""Evaluating a model on one's own labelled folders: the folder layouts (root/<class>/, train/ + test/, query/ +
gallery/), and ``scripts/evaluate.py`` end to end, its metrics checked against the metrics computed directly on
the model's embeddings of the same images."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metricsearch.data.folder import FolderSource
from metricsearch.data.io import load_rgb_image
from metricsearch.data.records import CLOSED_SET, QUERY_GALLERY, ZERO_SHOT, DatasetError
from metricsearch.metrics import calc_retrieval_metrics
from tests.dataset_fixtures import write_image
from tests.helpers import REPO_ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
# Small, fast settings of every evaluation here: one process, no worker processes.
QUICK = ["data.num_workers=0", "trainer=cpu"]


def make_classes(root: Path, names: list[str], images: int, seed: int, fmt: str = "JPEG") -> None:
    """``root/<name>/<k>.jpg`` (or .png): ``images`` small real images per class, colours depending on ``seed``."""
    suffix = ".png" if fmt == "PNG" else ".jpg"
    for c, name in enumerate(names):
        for k in range(images):
            write_image(root / name / f"{k}{suffix}", seed=seed + 100 * c + k, fmt=fmt)


def make_query_gallery(root: Path, train: bool = False) -> Path:
    """query/ (cat, dog, fox, owl: owl has no gallery images), gallery/ (cat, dog, fox, yak), optional train/."""
    make_classes(root / "query", ["cat", "dog", "fox", "owl"], images=2, seed=1000)
    make_classes(root / "gallery", ["cat", "dog", "fox", "yak"], images=3, seed=2000, fmt="PNG")
    if train:
        make_classes(root / "train", ["ant", "bee", "cat", "elk", "gnu", "hen"], images=4, seed=3000)
    return root


def run_evaluate(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/evaluate.py", *args],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def direct_metrics(ckpt: Path, paths: list[Path], labels: np.ndarray, query_count: int | None = None) -> dict:
    """The metrics of the checkpoint's embeddings of ``paths``, computed here image by image (no datamodule): the
    retrieval metrics and the verification FNMR at the default FMRs (conf/train.yaml's module.verification_fmrs)."""
    from metricsearch.inference.model_loading import load_embedder
    from metricsearch.metrics.verification import calc_fnmr_at_fmr

    embedder = load_embedder(ckpt=ckpt)
    embeddings = np.concatenate([embedder.embed_images([load_rgb_image(p)]) for p in paths])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    fmrs = (0.1, 0.01, 0.001)
    if query_count is None:
        return {
            **calc_retrieval_metrics(embeddings, labels, (1, 2, 4, 8)),
            **calc_fnmr_at_fmr(embeddings, labels, fmrs),
        }
    q = query_count
    gallery = {"gallery_embeddings": embeddings[q:], "gallery_labels": labels[q:]}
    return {
        **calc_retrieval_metrics(embeddings[:q], labels[:q], (1, 2, 4, 8), **gallery),
        **calc_fnmr_at_fmr(embeddings[:q], labels[:q], fmrs, **gallery),
    }


# --- the folder layouts ---


def test_query_and_gallery_share_labels_by_folder_name_and_warn_of_unanswerable_queries(tmp_path, caplog):
    root = make_query_gallery(tmp_path / "photos")
    with caplog.at_level(logging.WARNING):
        split = FolderSource(root).load()
    assert split.protocol == QUERY_GALLERY
    assert len(split.train) == 0 and len(split.test) == 8 and len(split.gallery) == 12
    assert split.num_queries == 8
    # Sorted names over query and gallery: cat 0, dog 1, fox 2, owl 3, yak 4; the same name is the same label.
    names = {**split.test.class_names, **split.gallery.class_names}
    assert names == {0: "cat", 1: "dog", 2: "fox", 3: "owl", 4: "yak"}
    for records in (split.test, split.gallery):
        for path, label in zip(records.paths, records.labels, strict=True):
            assert names[int(label)] == path.parent.name
    assert split.evaluation.paths == [*split.test.paths, *split.gallery.paths]
    assert "1 query classes have no gallery images (e.g. 'owl'): their 2 queries" in caplog.text


def test_query_gallery_with_train_folder_labels_train_classes_first(tmp_path):
    split = FolderSource(make_query_gallery(tmp_path / "photos", train=True)).load()
    assert split.train.class_names == {0: "ant", 1: "bee", 2: "cat", 3: "elk", 4: "gnu", 5: "hen"}
    # cat was trained on and keeps its label; the others follow the training classes in sorted order.
    assert split.test.class_names == {2: "cat", 6: "dog", 7: "fox", 8: "owl"}
    assert split.gallery.class_names == {2: "cat", 6: "dog", 7: "fox", 9: "yak"}


def test_query_gallery_layout_errors(tmp_path):
    root = tmp_path / "photos"
    make_classes(root / "query", ["cat"], images=2, seed=0)
    with pytest.raises(DatasetError, match=r"found query/ but no gallery/"):
        FolderSource(root).load()
    make_classes(root / "gallery", ["cat"], images=2, seed=10)
    assert FolderSource(root).load().protocol == QUERY_GALLERY
    with pytest.raises(DatasetError, match=r"protocol=closed_set does not apply to query/ \+ gallery/"):
        FolderSource(root, protocol=CLOSED_SET).load()
    make_classes(root / "test", ["cat"], images=2, seed=20)
    with pytest.raises(DatasetError, match=r"keep either test/"):
        FolderSource(root).load()
    with pytest.raises(ValueError, match=r"protocol=query_gallery is not one of zero_shot, closed_set"):
        FolderSource(root, protocol=QUERY_GALLERY)


def test_train_and_test_folders_under_the_closed_set_protocol(tmp_path):
    root = tmp_path / "photos"
    make_classes(root / "train", ["cat", "dog"], images=3, seed=0)
    make_classes(root / "test", ["cat", "dog"], images=2, seed=50)
    with pytest.raises(DatasetError, match=r"in both train/ and test/.*set data.source.protocol=closed_set"):
        FolderSource(root).load()
    split = FolderSource(root, protocol=CLOSED_SET).load()
    assert split.protocol == CLOSED_SET
    assert split.train.class_names == split.test.class_names == {0: "cat", 1: "dog"}
    make_classes(root / "test", ["emu"], images=2, seed=80)
    with pytest.raises(DatasetError, match=r"class 'emu' is in test/ but not in train/"):
        FolderSource(root, protocol=CLOSED_SET).load()


def test_train_fraction_zero_evaluates_every_class(tmp_path):
    root = tmp_path / "photos"
    make_classes(root, ["a", "b", "c"], images=2, seed=0)
    split = FolderSource(root, train_fraction=0).load()
    assert split.protocol == ZERO_SHOT and len(split.train) == 0
    assert split.test.class_names == {0: "a", 1: "b", 2: "c"} and len(split.test) == 6
    # The default still splits the classes: the first round(3 * 0.5) = 2 train, c is the test class.
    assert FolderSource(root).load().test.class_names == {2: "c"}
    with pytest.raises(DatasetError, match=r"closed_set needs the split given"):
        FolderSource(root, protocol=CLOSED_SET).load()


# --- scripts/evaluate.py ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint of a two-step training run (seed_cnn, 8-d) on a folder with train/ + test/."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "photos"
    make_classes(data / "train", [f"t{c}" for c in range(6)], images=4, seed=5000)
    make_classes(data / "test", ["x0", "x1", "x2"], images=3, seed=6000)
    run_dir = root / "run"
    command = [
        sys.executable,
        "train.py",
        "data=folder",
        f"data.root={data}",
        "backbone=seed_cnn",
        "head.embedding_dim=8",
        "data.image_size=32",
        "data.resize_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.val_fraction=0.34",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.max_time=null",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "callbacks.visualization.method=pca",
        "test_untrained=false",
        "test=false",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


def test_evaluate_a_backbone_on_class_folders_writes_table_metrics_and_pictures(tmp_path):
    from metricsearch.pipelines.evaluate import evaluate_model

    out2 = tmp_path / "out2"
    root = tmp_path / "photos"
    make_classes(root, ["apple", "banana", "cherry", "damson"], images=3, seed=0)
    out = tmp_path / "out"
    result = run_evaluate(["backbone=seed_cnn", "data=folder", f"data.root={root}", f"out={out}", *QUICK])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    metrics = summary["metrics"]["test"]
    # Every class is evaluated (train_fraction=0 unless given): 12 queries, each searching the other 11 images.
    assert metrics["num_queries"] == 12
    assert summary["data"]["test_classes"] == 4 and summary["data"]["train_images"] == 0
    assert (summary["model"]["kind"], summary["model"]["path"]) == ("backbone", "seed_cnn")
    for name in ("recall@1", "map@r", "r_precision", "nmi"):
        assert 0.0 <= metrics[name] <= 1.0
        # The printed table (its rows "│ name │ value │") shows the JSON's values, in percent.
        rows = [line.replace("│", " ").split() for line in result.stdout.splitlines()]
        assert [name, f"{100 * metrics[name]:.2f}"] in rows, result.stdout
    for file in ("plots/retrieval_test.png", "plots/confusion_test.png", "tables/confusion_test.csv"):
        assert (out / file).is_file(), file
        assert file in result.stdout
    # The random weights are seeded: the same evaluation measures the same. max_confusion_classes=0: no matrix.
    again = evaluate_model({"backbone": "seed_cnn"}, [f"data.root={root}", *QUICK], out2, max_confusion_classes=0)
    assert again.metrics == metrics
    assert "plots/retrieval_test.png" in again.files and "plots/confusion_test.png" not in again.files


def test_evaluate_a_checkpoint_equals_the_metrics_of_its_embeddings(trained, tmp_path):
    root = tmp_path / "photos"
    make_classes(root / "train", ["a", "b"], images=2, seed=0)
    make_classes(root / "test", ["c", "d", "e"], images=3, seed=70)
    out = tmp_path / "out"
    result = run_evaluate([f"ckpt={trained}", f"data.root={root}", f"out={out}", *QUICK])
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "metrics.json").read_text())["metrics"]["test"]
    split = FolderSource(root).load()
    expected = direct_metrics(trained, split.test.paths, split.test.labels)
    assert measured == pytest.approx(expected, abs=1e-6)
    assert f"{100 * expected['recall@1']:.2f}" in result.stdout


def test_evaluate_a_checkpoint_on_query_and_gallery_folders(trained, tmp_path):
    from metricsearch.pipelines.evaluate import evaluate_model

    root = make_query_gallery(tmp_path / "photos")
    evaluation = evaluate_model({"ckpt": trained}, [f"data.root={root}", *QUICK], tmp_path / "out")
    split = FolderSource(root).load()
    evaluated = split.evaluation
    expected = direct_metrics(trained, evaluated.paths, evaluated.labels, query_count=split.num_queries)
    assert evaluation.metrics == pytest.approx(expected, abs=1e-6)
    # The two owl queries have no correct answer in the gallery: left out of the metrics.
    assert evaluation.metrics["num_queries"] == 6
    assert evaluation.metrics["num_queries_left_out"] == 2
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "num_queries_left_out" in json.dumps(written) and evaluation.summary["data"]["protocol"] == QUERY_GALLERY
    assert {"metrics.json", "plots/retrieval_test.png", "tables/confusion_test.csv"} <= set(evaluation.files)


def test_a_checkpoint_whose_weights_are_another_architecture_is_refused_in_one_line(trained, tmp_path, capsys):
    from metricsearch.cli.evaluate import main_evaluate

    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["model_config"]["backbone"] = {
        "_target_": "metricsearch.models.backbone.TimmBackbone",
        "model_name": "resnet10t",
        "pretrained": False,
        "weights_file": None,
    }
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    root = tmp_path / "photos"
    make_classes(root, ["a", "b"], images=2, seed=0)
    status = main_evaluate([f"ckpt={foreign}", f"data.root={root}", f"out={tmp_path / 'out'}", *QUICK])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ckpt=") and "does not fit the model its config describes (resnet10t" in err[-1]
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", r"error: image folder: the data root .*missing does not exist; point data.source.root at"),
        ("empty", r"error: image folder: .*empty has 0 class sub-folders; expected root/<class>/<images>"),
        ("loose", r"error: image folder: .*loose holds images but no class sub-folders; put each class's images"),
        ("no_images", r"error: image folder: the class folder .*cat has no images"),
    ],
)
def test_a_folder_that_is_missing_or_has_no_images_is_a_one_line_error(layout, message, tmp_path, capsys):
    from metricsearch.cli.evaluate import main_evaluate

    root = tmp_path / layout
    if layout != "missing":
        root.mkdir()
    if layout == "loose":
        write_image(root / "photo.jpg", seed=1)
    if layout == "no_images":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("no photos yet\n")
    status = main_evaluate(["backbone=seed_cnn", f"data.root={root}", f"out={tmp_path / 'out'}", *QUICK])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err and re.search(message, err[-1]), err


def test_training_on_a_folder_without_training_images_is_refused_with_what_to_do(tmp_path):
    from metricsearch.pipelines.train import train
    from tests.helpers import compose_config

    root = make_query_gallery(tmp_path / "photos")
    cfg = compose_config(
        ["data=folder", f"data.root={root}", "backbone=seed_cnn", "data.num_workers=0"],
        tmp_path / "run",
        tmp_path,
        tiny=False,
    )
    with pytest.raises(DatasetError, match=r"train split .* is empty.*can be evaluated"):
        train(cfg)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_corrupt_image_is_one_line_naming_it_also_from_a_worker_process(num_workers, tmp_path, capsys):
    from metricsearch.cli.evaluate import main_evaluate

    root = tmp_path / "photos"
    make_classes(root, ["a", "b"], images=2, seed=0)
    broken = root / "b" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    args = ["backbone=seed_cnn", f"data.root={root}", f"out={tmp_path / 'out'}", f"num_workers={num_workers}"]
    status = main_evaluate([*args, "trainer=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    # torch re-raises a worker's exception with the worker's whole traceback as its message; the user reads only
    # what the image reader said.
    assert status == 1
    assert err[-1].startswith(f"error: cannot read image {broken} (OSError: ")
    assert err[-1].endswith("): remove or replace the file") and "Traceback" not in err[-1]
