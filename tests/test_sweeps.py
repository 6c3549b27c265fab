"""Sweeps: every W&B sweep combination composes and builds; Hydra multirun and Optuna run offline."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metricsearch.utils.config import instantiate_partial_with
from tests.helpers import REPO_ROOT, TINY, compose_config

SWEEP_FILES = sorted((REPO_ROOT / "sweeps").glob("*.yaml"))


def sweep_combinations(sweep: dict) -> list[list[str]]:
    """Every set of Hydra overrides a W&B sweep can generate: fixed command arguments + one value per parameter.

    Grid sweeps enumerate ``values``; a ``value`` is a constant. Distributions (min/max) contribute both ends.
    """
    fixed = [arg for arg in sweep["command"] if not str(arg).startswith("${")]
    names, choices = [], []
    for name, spec in sweep["parameters"].items():
        if "values" in spec:
            options = spec["values"]
        elif "value" in spec:
            options = [spec["value"]]
        else:
            options = [spec["min"], spec["max"]]
        names.append(name)
        choices.append(options)
    return [fixed + [f"{n}={v}" for n, v in zip(names, combo, strict=True)] for combo in itertools.product(*choices)]


def test_sweep_files_exist():
    assert [p.name for p in SWEEP_FILES] >= ["loss.yaml"]


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda p: p.name)
def test_every_sweep_combination_composes_and_builds(sweep_file, tmp_path):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["program"] == "train.py" and (REPO_ROOT / sweep["program"]).is_file()
    # The agent must pass parameters as Hydra overrides (key=value), not argparse flags (--key=value).
    assert "${args_no_hyphens}" in sweep["command"]
    combinations = sweep_combinations(sweep)
    assert len(combinations) == len(set(map(tuple, combinations))) >= 3
    built: set[str] = set()
    for overrides in combinations:
        cfg = compose_config(overrides, tmp_path / "out", tmp_path / "data")
        assert sweep["metric"]["name"] == cfg.monitor, "the sweep must optimize the metric the runs log"
        for override in overrides:
            key, value = override.split("=", 1)
            if key in ("loss", "miner"):
                chosen = cfg.get(key)
                assert (chosen is None) == (value == "none"), override
        # Build the loss and miner once per distinct pair: a wrong argument name fails here, not hours into a sweep.
        signature = yaml.safe_dump(OmegaConf.to_container(cfg.loss)) + yaml.safe_dump(
            OmegaConf.to_container(cfg.miner) if cfg.miner is not None else None
        )
        if signature in built:
            continue
        built.add(signature)
        loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
        loss_cfg.pop("lr_multiplier", None)
        assert instantiate_partial_with(loss_cfg, num_classes=8, embedding_size=16) is not None
        if cfg.miner is not None:
            instantiate(cfg.miner)
    if sweep_file.name == "loss.yaml":
        losses = {o.split("=", 1)[1] for combo in combinations for o in combo if o.startswith("loss=")}
        assert len(losses) >= 6
        # Losses that customarily come with a miner keep it (the loss config selects it).
        cfg = compose_config(["loss=triplet"], tmp_path / "out", tmp_path / "data")
        assert cfg.miner._target_.endswith("TripletMarginMiner")


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_hydra_multirun_with_wandb_gives_each_job_its_own_run(tmp_path, data_dir):
    """Jobs of one multirun share a process: the second job must not log into the first job's W&B run."""
    result = _run(
        [
            "-m",
            *TINY,
            "logger=wandb",
            "loss=triplet,supcon",
            "test_untrained=false",
            "callbacks.visualization.prefixes=[]",
            f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_ids = []
    for job in ("0", "1"):
        assert (tmp_path / job / "metrics.json").is_file()
        offline_runs = list((tmp_path / job / "wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1, offline_runs
        run_ids.append(offline_runs[0].name.rsplit("-", 1)[1])
    assert run_ids[0] != run_ids[1]


def test_optuna_readme_command_optimizes_the_selected_checkpoints_val_metric(tmp_path, data_dir):
    """`python train.py hparams_search=optuna` as the README gives it (test evaluation included), shrunk.

    Every trial must complete, and the value Optuna records must be the validation metric of the checkpoint the
    run selected (and tested), as written to its metrics.json.
    """
    storage = tmp_path / "optuna.db"
    # A command-line value would pin a searched parameter (the sweeper treats it as fixed): leave embedding_dim free.
    tiny = [o for o in TINY if not o.startswith(("head.embedding_dim=", "trainer.max_epochs="))]
    result = _run(
        [
            "hparams_search=optuna",
            *tiny,
            # Two epochs, so the selected checkpoint need not be the last epoch.
            "trainer.max_epochs=2",
            "trainer.limit_test_batches=1",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=1",
            f"hydra.sweeper.storage=sqlite:///{storage}",
            "callbacks.visualization.prefixes=[]",
            f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Failed experiment" not in result.stdout + result.stderr
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optimizer.lr", "loss.margin", "head.embedding_dim"}
    assert 0.0 <= float(best["best_value"]) <= 1.0
    assert 1e-4 <= float(best["best_params"]["optimizer.lr"]) <= 3e-3
    assert storage.is_file() and storage.stat().st_size > 0
    trials = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert len(trials) == 2
    for trial in trials:
        config = yaml.safe_load((trial / "config.yaml").read_text())
        assert config["head"]["embedding_dim"] in (64, 128, 256)

    import optuna

    study = optuna.load_study(study_name="train_optuna", storage=f"sqlite:///{storage}")
    recorded = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in recorded] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial, folder in zip(recorded, trials, strict=True):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["optimizer"]["lr"] == pytest.approx(trial.params["optimizer.lr"])
        written = json.loads((folder / "metrics.json").read_text())
        assert "recall@1" in written["metrics"]["test"]  # the test evaluation ran, as in the README command
        assert trial.value == written["metrics"]["val_best"]["recall@1"]
    assert float(best["best_value"]) == max(t.value for t in recorded)
