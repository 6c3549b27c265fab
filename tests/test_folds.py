"""Class-disjoint folds of the training classes (``data.num_folds``, ``data.fold``): the splits and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.utils import instantiate

from metricsearch.data.datamodule import MetricDataModule, class_folds
from metricsearch.utils.config import ConfigError, validate_config
from tests.helpers import compose_config


def datamodule(overrides: list[str], tmp_path, data_dir) -> MetricDataModule:
    """The tiny built-in data's datamodule as the config builds it (6 training classes, 6 test classes), set up."""
    cfg = compose_config(overrides, tmp_path, data_dir)
    validate_config(cfg)
    module: MetricDataModule = instantiate(cfg.data)
    module.setup()
    return module


@pytest.mark.parametrize(("num_classes", "num_folds"), [(2, 2), (7, 3), (10, 4), (100, 4), (11, 11)])
def test_folds_are_disjoint_balanced_and_cover_every_class(num_classes, num_folds):
    classes = np.arange(100, 100 + num_classes)
    folds = class_folds(classes, num_folds, seed=0)

    assert len(folds) == num_folds
    joined = np.concatenate(folds)
    assert sorted(joined.tolist()) == classes.tolist()  # every class exactly once: disjoint and covering
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_folds_depend_on_the_set_of_classes_and_the_seed_only():
    classes = np.array([7, 3, 9, 1, 5, 2, 8, 4])
    folds = class_folds(classes, 3, seed=0)
    shuffled = class_folds(classes[::-1].tolist() + [7, 3], 3, seed=0)  # another order, with repeats

    assert [f.tolist() for f in folds] == [f.tolist() for f in shuffled]
    assert [f.tolist() for f in folds] != [f.tolist() for f in class_folds(classes, 3, seed=1)]


def test_the_datamodule_validates_on_its_fold_and_trains_on_the_others(tmp_path, data_dir):
    folds_setting = ["data.num_folds=3", "data.fold_seed=5"]
    plain = datamodule([], tmp_path, data_dir)
    training_classes = plain.split.train.classes
    folds = class_folds(training_classes, 3, seed=5)

    seen_val = []
    for fold in range(3):
        module = datamodule([*folds_setting, f"data.fold={fold}"], tmp_path, data_dir)
        assert module.val_records.classes.tolist() == folds[fold].tolist()
        others = np.concatenate([f for i, f in enumerate(folds) if i != fold])
        assert module.train_records.classes.tolist() == sorted(others.tolist())
        assert len(module.train_records) + len(module.val_records) == len(plain.split.train)
        assert module.num_train_classes == len(others)
        # The test split is never touched by the folds.
        assert module.split.test.labels.tolist() == plain.split.test.labels.tolist()
        assert module.split.test.paths == plain.split.test.paths
        seen_val.extend(module.val_records.classes.tolist())
    assert sorted(seen_val) == training_classes.tolist()


def test_runs_of_different_seeds_share_the_folds(tmp_path, data_dir):
    first = datamodule(["seed=1", "data.num_folds=2", "data.fold=1"], tmp_path, data_dir)
    second = datamodule(["seed=2", "data.num_folds=2", "data.fold=1"], tmp_path, data_dir)
    assert first.seed != second.seed
    assert first.val_records.paths == second.val_records.paths
    assert first.train_records.paths == second.train_records.paths
    # Without folds, the held-out classes follow the run's seed; val_fraction plays no part with folds.
    ignored = datamodule(["seed=1", "data.num_folds=2", "data.fold=1", "data.val_fraction=0"], tmp_path, data_dir)
    assert ignored.val_records.paths == first.val_records.paths


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.num_folds=1"], "data.num_folds=1 must be 0"),
        (["data.num_folds=-2"], "data.num_folds=-2 must be 0"),
        (["data.num_folds=4", "data.fold=4"], "data.fold=4 is not a fold of data.num_folds=4; set 0..3"),
        (["data.num_folds=4", "data.fold=-1"], "data.fold=-1 is not a fold of data.num_folds=4"),
        (["data.num_folds=2", "data.fold_seed=x"], "data.fold_seed=x is not a whole number"),
        (["save_test_embeddings=true", "test=false"], "save_test_embeddings=true writes the test evaluation's"),
    ],
)
def test_impossible_fold_settings_are_refused_in_one_line(tmp_path, data_dir, overrides, message):
    cfg = compose_config(overrides, tmp_path, data_dir)
    with pytest.raises(ConfigError, match=message) as caught:
        validate_config(cfg)
    assert "\n" not in str(caught.value)


def test_the_datamodule_refuses_more_folds_than_training_classes_and_bad_folds(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="data.num_folds=7 is larger than the 6 training classes") as caught:
        datamodule(["data.num_folds=7"], tmp_path, data_dir)
    assert "\n" not in str(caught.value)
    for num_folds, fold, message in [(1, 0, "data.num_folds=1 cannot split"), (3, 3, "data.fold=3 is not a fold")]:
        with pytest.raises(ConfigError, match=message):
            MetricDataModule(source=None, num_folds=num_folds, fold=fold)
    with pytest.raises(ConfigError, match="data.num_folds=1 cannot split"):
        class_folds(range(5), 1)
    with pytest.raises(ConfigError, match="data.num_folds=6 is larger than the 5 training classes"):
        class_folds(range(5), 6)
