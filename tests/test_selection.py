"""`selection=val | last | test_best`: which model a run tests and reports, and that the outputs say which."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from metricsearch.pipelines.selection import apply_selection
from metricsearch.pipelines.train import train
from metricsearch.utils.config import ConfigError, validate_config
from tests.helpers import compose_config

TWO_EPOCHS = ["loss=proxy_anchor", "trainer.max_epochs=2", "module.compute_nmi=false", "test_untrained=false"]


def logged(run_dir, key: str) -> list[float]:
    """Every value of ``key`` in the run's CSV log, in order."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_test_best_reports_the_best_per_epoch_test_evaluation_and_says_it_is_optimistic(tmp_path, data_dir, capsys):
    cfg = compose_config([*TWO_EPOCHS, "selection=test_best"], tmp_path, data_dir)
    train(cfg)

    summary = json.loads((tmp_path / "metrics.json").read_text())
    per_epoch = logged(tmp_path, "test_epoch/recall@1")
    assert len(per_epoch) == 2
    # The tested checkpoint is the epoch with the best test Recall@1, and testing it again gives that number.
    assert summary["metrics"]["test_epoch_best"]["recall@1"] == pytest.approx(max(per_epoch))
    assert summary["metrics"]["test"]["recall@1"] == pytest.approx(max(per_epoch))
    assert summary["selection"]["mode"] == "test_best" and summary["selection"]["optimistic"] is True
    assert "OPTIMISTIC" in summary["selection"]["description"]
    assert "selection=test_best" in capsys.readouterr().out
    assert logged(tmp_path, "val/recall@1") == []  # nothing is called validation
    # Every training class is trained on: 6 of the tiny data's 12 classes, none held out.
    state = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert state["loss.proxies"].shape[0] == 6


def test_last_trains_on_every_training_class_and_tests_the_final_model(tmp_path, data_dir):
    cfg = compose_config([*TWO_EPOCHS, "selection=last"], tmp_path, data_dir)
    train(cfg)

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["selection"] == {
        "mode": "last",
        "optimistic": False,
        "description": "the last epoch's model, trained on all training classes (no model selection)",
    }
    checkpoint = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == summary["global_step"]
    assert checkpoint["state_dict"]["loss.proxies"].shape[0] == 6
    assert "val_best" not in summary["metrics"] and logged(tmp_path, "val/recall@1") == []


def test_val_holds_classes_out_and_records_the_mode(tmp_path, data_dir):
    cfg = compose_config([*TWO_EPOCHS], tmp_path, data_dir)
    train(cfg)

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["selection"]["mode"] == "val" and summary["selection"]["optimistic"] is False
    assert summary["metrics"]["val_best"]["recall@1"] == pytest.approx(max(logged(tmp_path, "val/recall@1")))
    state = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert state["loss.proxies"].shape[0] == 4  # 2 of the 6 training classes held out (val_fraction 0.34)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["selection=best"], "selection=best is not one of val, last, test_best"),
        (["data.val_fraction=0"], "selection=val chooses the checkpoint on held-out training classes"),
    ],
)
def test_impossible_selections_are_refused_in_one_line(overrides, message, tmp_path, data_dir):
    cfg = compose_config(overrides, tmp_path, data_dir)
    with pytest.raises(ConfigError, match=message) as caught:
        validate_config(cfg)
    assert "\n" not in str(caught.value)


def test_test_best_is_refused_in_a_hyperparameter_search(tmp_path, data_dir):
    cfg = compose_config(["selection=test_best", "hparams_search=optuna"], tmp_path, data_dir)
    with pytest.raises(ConfigError, match="would tune on the test classes"):
        apply_selection(cfg)


def test_test_best_monitors_the_same_metric_on_the_test_classes(tmp_path, data_dir):
    cfg = compose_config(["selection=test_best", "monitor=val/map@r"], tmp_path, data_dir)
    composed = OmegaConf.to_container(cfg)
    resolved, mode = apply_selection(cfg)
    assert mode == "test_best"
    assert resolved.monitor == "test_epoch/map@r" and resolved.optimized_metric == "test_epoch/map@r"
    assert resolved.callbacks.model_checkpoint.monitor == "test_epoch/map@r"
    assert resolved.data.val_fraction == 0 and resolved.data.validate_on_test is True
    # A new config: the composed one is left as it was.
    assert OmegaConf.to_container(cfg) == composed and cfg.monitor == "val/map@r"
