"""The supervision study: per-run rows from the run folders, mean and t-interval per setting, the steps and seeds
they ran, the plot; and the settings each variant trains (same model, data and schedule; the loss of each setting).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from scipy import stats

from metricsearch.pipelines.supervision_study import (
    VARIANTS,
    run_study,
    study_settings,
    summarize_study,
    train_overrides,
)
from tests.helpers import compose_config


def _write_run(
    folder, test: dict[str, float], untrained: dict[str, float] | None = None, mode: str = "val", steps: int = 50
) -> None:
    folder.mkdir(parents=True)
    metrics = {"test": test} | ({"untrained": untrained} if untrained else {})
    summary = {"selection": {"mode": mode}, "metrics": metrics} | ({"global_step": steps} if steps else {})
    (folder / "metrics.json").write_text(json.dumps(summary))


def test_summary_is_the_mean_and_t_interval_over_seeds_of_what_finished(tmp_path):
    runs = tmp_path / "out" / "runs"
    _write_run(runs / "class" / "seed0", {"recall@1": 0.20, "map@r": 0.05}, {"recall@1": 0.06, "map@r": 0.01})
    _write_run(runs / "class" / "seed1", {"recall@1": 0.30, "map@r": 0.07}, {"recall@1": 0.08, "map@r": 0.01})
    _write_run(runs / "none_simclr" / "seed0", {"recall@1": 0.10, "map@r": 0.02}, mode="last")
    _write_run(runs / "imagenet_frozen", {"recall@1": 0.5, "map@r": 0.2}, steps=0)
    (runs / "pairs_400" / "seed0").mkdir(parents=True)  # unfinished: no metrics.json

    summary = summarize_study(tmp_path / "out", tmp_path / "results")

    by_name = {entry["setting"]: entry for entry in summary}
    assert list(by_name) == ["class", "untrained", "none_simclr", "imagenet_frozen"]
    half = stats.t.ppf(0.975, 1) * math.sqrt(((20 - 25) ** 2 + (30 - 25) ** 2) / 1) / math.sqrt(2)
    assert by_name["class"]["recall@1"] == 25.0 and by_name["class"]["recall@1_half_interval"] == pytest.approx(
        half, abs=0.01
    )
    assert by_name["untrained"]["recall@1"] == 7.0 and by_name["untrained"]["runs"] == 2
    assert by_name["none_simclr"]["runs"] == 1 and by_name["none_simclr"]["recall@1_half_interval"] is None
    with open(tmp_path / "results" / "runs.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["setting"], r["seed"], r["selection"]) for r in rows][-1] == ("imagenet_frozen", "0", "-")
    table = (tmp_path / "results" / "summary.md").read_text()
    assert f"| `class` | 1,600 image labels (80 classes) | 0, 1 | 25.00 ± {half:.2f} |" in table
    assert "| `none_simclr` | none | 0 | 10.00 | 2.00 |" in table
    assert "| `imagenet_frozen` | ImageNet labels (1.28M, not of this data) | - | 50.00 | 20.00 |" in table
    # The steps come from the runs themselves, stated once under the table (the references trained none).
    assert table.endswith("|\n\nEvery trained run: 50 optimizer steps.\n")
    assert [r["steps"] for r in rows] == ["50", "0", "50", "0", "50", "0"]
    assert (tmp_path / "results" / "supervision.png").stat().st_size > 10_000


def test_runs_of_different_step_budgets_are_called_out(tmp_path):
    runs = tmp_path / "out" / "runs"
    _write_run(runs / "class" / "seed0", {"recall@1": 0.2, "map@r": 0.05}, steps=50)
    _write_run(runs / "class" / "seed1", {"recall@1": 0.3, "map@r": 0.07}, steps=400)
    summarize_study(tmp_path / "out", tmp_path / "results")
    table = (tmp_path / "results" / "summary.md").read_text()
    assert "did not take one number of optimizer steps (50, 400): not comparable" in table


def _composed(variant: str, setting, steps: int = 2000):
    overrides = train_overrides(Path("/out"), Path("/data"), setting, 0, steps, VARIANTS[variant])
    overrides = [o for o in overrides if not o.startswith("hydra.")]
    return compose_config(overrides, Path("/out/run"), Path("/data"), tiny=False)


def test_the_cifar_standin_variant_trains_the_seed_example_for_every_setting():
    expected_loss = {
        "class": "metricsearch.models.losses.AnchorPositiveSoftmaxLoss",
        "pairs": "pytorch_metric_learning.losses.ContrastiveLoss",
        "triplets": "pytorch_metric_learning.losses.TripletMarginLoss",
        "none": None,
    }
    settings = study_settings((400, 3200), VARIANTS["cifar_standin"])
    assert [s.name for s in settings] == [
        "class", "pairs_400", "pairs_3200", "triplets_400", "triplets_3200", "none_simclr", "none_vicreg", "none_moco"
    ]  # fmt: skip
    for setting in settings:
        cfg = _composed("cifar_standin", setting)
        mode = setting.name.split("_")[0]
        assert cfg.supervision.mode == mode
        # The seed example's network, head, optimizer and batch, on its closed-set stand-in, for every setting.
        assert cfg.backbone._target_ == "metricsearch.models.seed_cnn.SeedCNN"
        assert (cfg.head.embedding_dim, cfg.head.normalize) == (8, True)
        assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("torch.optim.Adam", 1e-3, 0)
        assert cfg.get("scheduler") is None and cfg.data.batch_size == 20
        assert (cfg.data.source.num_classes, cfg.data.source.protocol) == (10, "closed_set")
        # The same steps and validations for every setting, however long its epoch.
        assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (2000, 250)
        assert cfg.trainer.check_val_every_n_epoch is None and cfg.trainer.limit_train_batches is None
        # The setting's own loss, not the seed example's, and no miner.
        assert OmegaConf.select(cfg, "loss._target_") == expected_loss[mode], setting.name
        assert cfg.get("miner") is None
        if mode == "none":
            assert cfg.supervision.method == setting.name.split("_")[1] and cfg.supervision.queue_size == 400
        assert cfg.test_untrained == (mode == "class")


def test_the_builtin_variant_keeps_the_default_run_at_32_px():
    for setting in study_settings((400, 3200), VARIANTS["builtin"]):
        cfg = _composed("builtin", setting, steps=50)
        assert (cfg.backbone.model_name, cfg.backbone.pretrained) == ("resnet10t", False)
        assert (cfg.data.source.image_size, cfg.data.image_size, cfg.data.batch_size) == (32, 32, 64)
        assert (cfg.trainer.max_steps, cfg.trainer.limit_train_batches) == (50, 25)
        assert cfg.supervision.mode == setting.name.split("_")[0]


@pytest.mark.slow
def test_the_cifar_standin_study_trains_summarizes_and_says_what_selected(tmp_path, data_dir):
    out = tmp_path / "out"
    variant = VARIANTS["cifar_standin"]
    run_study(out, data_dir, seeds=(0,), steps=4, budgets=(40,), frozen_reference=False, variant=variant,
              settings=["class", "pairs_40"])  # fmt: skip
    for name in ("class", "pairs_40"):
        summary = json.loads((out / "runs" / name / "seed0" / "metrics.json").read_text())
        assert summary["global_step"] == 4
        assert summary["selection"]["mode"] == "val"
    pairs = json.loads((out / "runs" / "pairs_40" / "seed0" / "metrics.json").read_text())
    assert "on the labelled training images data.pairs_file does not name" in pairs["selection"]["description"]
    summary = summarize_study(out, tmp_path / "results", budgets=(40,), variant=variant)
    assert [entry["setting"] for entry in summary] == ["class", "untrained", "pairs_40"]
    assert summary[0]["labels"] == "800 image labels (10 classes)"
    assert (tmp_path / "results" / "summary.md").read_text().endswith("Every trained run: 4 optimizer steps.\n")
