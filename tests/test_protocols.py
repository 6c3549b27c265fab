"""Evaluation protocols (zero_shot, closed_set, query_gallery) in the data model and the datamodule, the neighbour
confusion matrix and query/gallery retrieval examples against plain loops, the loss curve, and the CIFAR-10 example
(`experiment=seed_cifar10`) end to end on its built-in stand-in."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from metricsearch.analysis.confusion import neighbour_confusion
from metricsearch.analysis.retrieval_examples import find_retrieval_examples
from metricsearch.callbacks.loss_curve import LossCurveCallback, moving_average
from metricsearch.data.datamodule import MetricDataModule, split_validation_images
from metricsearch.data.records import CLOSED_SET, QUERY_GALLERY, DatasetError, DatasetSplit, ImageRecords
from metricsearch.data.synthetic import SyntheticSource
from metricsearch.utils.config import ConfigError
from tests.dataset_fixtures import write_image
from tests.helpers import run_train


def records(labels: list[int], folder: Path | None = None, start: int = 0) -> ImageRecords:
    """Records of the given labels; with ``folder``, real small JPEGs are written there."""
    paths = []
    for i, label in enumerate(labels):
        path = Path(f"img{start + i}.jpg") if folder is None else folder / f"{label}" / f"{start + i}.jpg"
        if folder is not None:
            write_image(path, seed=start + i)
        paths.append(path)
    return ImageRecords(paths, np.asarray(labels))


# ---------------------------------------------------------------------------------------------------- data model
def test_zero_shot_refuses_a_test_class_seen_in_training():
    with pytest.raises(DatasetError, match="closed_set protocol for shared ones"):
        DatasetSplit(records([0, 1]), records([1, 2]))


def test_closed_set_refuses_a_test_class_never_trained():
    DatasetSplit(records([0, 1, 1]), records([0, 1]), protocol=CLOSED_SET)
    with pytest.raises(DatasetError, match="never appear in training"):
        DatasetSplit(records([0, 1]), records([1, 2]), protocol=CLOSED_SET)


def test_a_gallery_goes_with_query_gallery_only():
    with pytest.raises(DatasetError, match="needs one"):
        DatasetSplit(records([0]), records([1]), protocol=QUERY_GALLERY)
    with pytest.raises(DatasetError, match="gallery goes with"):
        DatasetSplit(records([0]), records([1]), gallery=records([1]))
    with pytest.raises(DatasetError, match="not one of"):
        DatasetSplit(records([0]), records([1]), protocol="open_world")


def test_the_evaluation_set_is_the_queries_then_the_gallery():
    split = DatasetSplit(records([0, 0]), records([5, 6], start=10), QUERY_GALLERY, records([6, 5, 5], start=20))
    assert split.num_queries == 2
    assert split.evaluation.labels.tolist() == [5, 6, 6, 5, 5]
    assert [p.name for p in split.evaluation.paths] == ["img10.jpg", "img11.jpg", "img20.jpg", "img21.jpg", "img22.jpg"]
    plain = DatasetSplit(records([0]), records([1, 1]))
    assert plain.num_queries is None and plain.evaluation is plain.test


def test_closed_set_validation_holds_out_images_of_every_class():
    labels = [0] * 10 + [1] * 5 + [2] * 2 + [3]
    train, val = split_validation_images(records(labels), 0.2, seed=3)
    assert np.bincount(val.labels, minlength=4).tolist() == [2, 1, 1, 0]
    assert np.bincount(train.labels, minlength=4).tolist() == [8, 4, 1, 1]
    assert not set(map(str, train.paths)) & set(map(str, val.paths))
    again_train, _ = split_validation_images(records(labels), 0.2, seed=3)
    assert [str(p) for p in again_train.paths] == [str(p) for p in train.paths]
    with pytest.raises(DatasetError, match="below 1"):
        split_validation_images(records(labels), 1.0, seed=0)


@dataclass
class FixedSource:
    """A dataset source that returns a given split (the datamodule only calls ``load``)."""

    split: DatasetSplit
    root: str = "unused"

    def load(self) -> DatasetSplit:
        return self.split


def test_the_datamodule_validates_closed_set_on_the_training_classes(tmp_path):
    labels = np.repeat(np.arange(4), 6).tolist()
    split = DatasetSplit(records(labels, tmp_path), records([0, 1, 2, 3], tmp_path, start=100), protocol=CLOSED_SET)
    datamodule = MetricDataModule(FixedSource(split), batch_size=8, num_workers=0, image_size=32, resize_size=32)
    datamodule.setup()
    assert datamodule.val_records.classes.tolist() == [0, 1, 2, 3]
    assert datamodule.num_train_classes == 4
    assert datamodule.test_num_queries is None
    folds = MetricDataModule(FixedSource(split), num_workers=0, num_folds=2)
    with pytest.raises(ConfigError, match="set data.num_folds=0"):
        folds.setup()


def test_the_test_loader_embeds_queries_then_gallery_and_says_how_many_are_queries(tmp_path):
    split = DatasetSplit(
        records([0, 0, 1, 1, 2, 2], tmp_path),
        records([7, 8, 9], tmp_path, start=100),
        QUERY_GALLERY,
        records([8, 7, 7, 9, 8], tmp_path, start=200),
    )
    datamodule = MetricDataModule(
        FixedSource(split),
        batch_size=4,
        eval_batch_size=3,
        num_workers=0,
        val_fraction=0,
        image_size=32,
        resize_size=32,
    )
    seen_labels, seen_indices = [], []
    for batch in datamodule.test_dataloader():
        seen_labels += batch["label"].tolist()
        seen_indices += batch["index"].tolist()
    assert seen_indices == list(range(8))
    assert seen_labels == [7, 8, 9, 8, 7, 7, 9, 8]
    assert datamodule.test_num_queries == 3
    assert datamodule.val_num_queries is None
    on_test = MetricDataModule(FixedSource(split), num_workers=0, val_fraction=0, validate_on_test=True)
    assert on_test.val_num_queries == 3


def test_synthetic_closed_set_tests_the_last_sixth_of_every_class(tmp_path):
    split = SyntheticSource(tmp_path, num_classes=4, images_per_class=12, image_size=16, protocol=CLOSED_SET).load()
    assert split.protocol == CLOSED_SET
    assert np.bincount(split.test.labels).tolist() == [2, 2, 2, 2]
    assert np.bincount(split.train.labels).tolist() == [10, 10, 10, 10]
    assert all(p.stem in ("010", "011") for p in split.test.paths)
    with pytest.raises(ValueError, match="images_per_class to 12 or more"):
        SyntheticSource(tmp_path, num_classes=4, images_per_class=6, protocol=CLOSED_SET)


# ------------------------------------------------------------------------------------- confusion and examples
def reference_confusion(x, labels, per_class, k, query_count=None):
    """The example's confusion matrix by plain loops: first images of each class, k nearest by sorted score."""
    classes = sorted(set(labels.tolist()))
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    for c in classes:
        members = [i for i in range(len(x)) if labels[i] == c and (query_count is None or i < query_count)]
        for q in members[:per_class]:
            candidates = [j for j in range(len(x)) if (j != q if query_count is None else j >= query_count)]
            ranked = sorted(candidates, key=lambda j: (-float(np.dot(x[q], x[j])), j))
            for j in ranked[:k]:
                counts[classes.index(c), classes.index(labels[j])] += 1
    return counts


@pytest.mark.parametrize("query_count", [None, 30])
def test_the_neighbour_confusion_matrix_matches_a_plain_loop(query_count):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=70)
    # Quantised embeddings make many exact ties: the tie rule (increasing index) must match too.
    x = np.round(rng.normal(size=(70, 4)) + labels[:, None] * 0.5, 0).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-6
    shuffled = rng.permutation(70)
    confusion = neighbour_confusion(x[shuffled], labels[shuffled], shuffled, per_class=4, k=6, query_count=query_count)
    expected = reference_confusion(x, labels, per_class=4, k=6, query_count=query_count)
    assert confusion.classes.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(confusion.counts, expected)
    assert confusion.counts.sum() == 6 * confusion.queries_per_class.sum()
    assert confusion.accuracy == pytest.approx(np.trace(expected) / expected.sum())


def test_query_gallery_examples_search_the_gallery_only():
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 2, 3, 0, 0, 1, 1, 2, 2, 9])
    x = rng.normal(size=(11, 3)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    examples = find_retrieval_examples(x, labels, num_queries=3, k=4, seed=0, query_count=4)
    # Query 3's class is not in the gallery: never picked.
    assert set(examples.query_indices.tolist()) <= {0, 1, 2}
    assert len(examples.query_indices) == 3
    for q, query in enumerate(examples.query_indices):
        expected = sorted(range(4, 11), key=lambda j: (-float(x[query] @ x[j]), j))[:4]
        assert examples.neighbor_indices[q].tolist() == expected
        assert examples.neighbor_labels[q].tolist() == labels[expected].tolist()


# ------------------------------------------------------------------------------------------------- loss curve
def test_moving_average_matches_a_loop_and_the_history_survives_a_checkpoint():
    values = np.array([4.0, 2.0, 6.0, 1.0, 3.0])
    expected = [np.mean(values[max(0, i - 2) : i + 1]) for i in range(5)]
    np.testing.assert_allclose(moving_average(values, 3), expected)
    callback = LossCurveCallback(smoothing=3)
    callback.steps, callback.losses, callback.epochs = [1, 2], [0.5, 0.25], [0, 0]
    restored = LossCurveCallback()
    restored.load_state_dict(torch.load(_roundtrip(callback.state_dict()), weights_only=True))
    assert (restored.steps, restored.losses, restored.epochs) == ([1, 2], [0.5, 0.25], [0, 0])
    with pytest.raises(ValueError, match="at least 1"):
        LossCurveCallback(smoothing=0)


def _roundtrip(state: dict) -> object:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# ------------------------------------------------------------------------------------- the CIFAR-10 example
def test_the_cifar10_example_runs_on_its_builtin_stand_in(tmp_path, data_dir):
    run_dir = tmp_path / "seed"
    result = run_train(
        [
            "experiment=seed_cifar10",
            "data=synthetic_cifar",
            # The tiny settings' synthetic sizes, reset to the stand-in's own (10 classes, closed set, 32 px).
            "data.source.num_classes=10",
            "data.source.images_per_class=24",
            "data.batch_size=20",
            "data.val_fraction=0.2",
            "sampler.batches_per_epoch=3",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=null",
        ],
        run_dir,
        data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 10 classes x the last sixth (4) of 24 images: 40 test queries, every class in training.
    assert metrics["metrics"]["test"]["num_queries"] == 40
    for name in ("retrieval_test.png", "confusion_test.png", "loss_curve.png"):
        assert (run_dir / "plots" / name).stat().st_size > 0, name
    with open(run_dir / "tables" / "confusion_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100
    # First 10 test images of each class (4 exist) x 10 neighbours each.
    per_class = {}
    for row in rows:
        per_class[row["query_class"]] = per_class.get(row["query_class"], 0) + int(row["count"])
    assert set(per_class.values()) == {40}
    with open(run_dir / "tables" / "retrieval_test.csv") as f:
        grid = list(csv.DictReader(f))
    assert len({row["query"] for row in grid}) == 5 and len(grid) == 50
    with open(run_dir / "tables" / "loss_curve.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2, 3]
