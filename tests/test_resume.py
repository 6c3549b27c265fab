"""`resume=auto`: which settings make two runs the same run, and which run folder a rerun continues."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from metricsearch.analysis.run_folder import LAST_CHECKPOINT
from metricsearch.pipelines.resume import RUN_FOLDER, find_resumable_run, run_identity
from metricsearch.pipelines.run_config import resolve_run_config
from tests.helpers import compose_config

COMMAND = ["trainer.max_epochs=6", "trainer.limit_train_batches=3", "trainer.deterministic=true"]


def _saved(cfg) -> dict:
    """What a run writes as its config.yaml, read back the way find_resumable_run reads it."""
    return yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))


def test_same_command_in_another_run_folder_is_the_same_run(tmp_path, data_dir):
    first = compose_config(COMMAND, tmp_path / "runs" / "A", data_dir)
    # A plain rerun gets a new run folder; `resume=auto` is what is added to continue.
    rerun = compose_config([*COMMAND, "resume=auto"], tmp_path / "runs" / "B", data_dir)
    assert run_identity(_saved(first)) == run_identity(rerun)
    identity = run_identity(rerun)
    # Paths inside the run folder are kept, relative to it: the checkpoint folder is still part of the identity.
    assert identity["callbacks"]["model_checkpoint"]["dirpath"] == f"{RUN_FOLDER}/checkpoints"
    assert identity["trainer"]["default_root_dir"] == RUN_FOLDER
    assert "resume" not in identity and "paths" not in identity


def test_settings_that_do_not_change_training_are_not_identity(tmp_path, data_dir):
    base = run_identity(compose_config(COMMAND, tmp_path / "A", data_dir))
    cosmetic = [
        "logger=tensorboard",
        "data.num_workers=3",
        "data.eval_batch_size=7",
        "trainer.enable_progress_bar=true",
        "trainer.log_every_n_steps=1",
        "callbacks.visualization.every_n_epochs=1",
        "test_untrained=false",
        f"ckpt_path={tmp_path / 'elsewhere.ckpt'}",
    ]
    assert run_identity(compose_config([*COMMAND, *cosmetic], tmp_path / "B", data_dir)) == base


def test_settings_that_change_training_are_identity(tmp_path, data_dir):
    base = run_identity(compose_config(COMMAND, tmp_path / "A", data_dir))
    for change in ["optimizer.lr=0.01", "seed=1", "trainer.max_epochs=7", "loss=arcface", "data.batch_size=8"]:
        assert run_identity(compose_config([*COMMAND, change], tmp_path / "A", data_dir)) != base, change
    # Another dataset folder may hold other data: it stays part of the identity.
    assert run_identity(compose_config(COMMAND, tmp_path / "A", tmp_path / "other_data")) != base


def _fake_run(folder: Path, cfg, mtime: int, finished: bool = False) -> Path:
    (folder / LAST_CHECKPOINT).parent.mkdir(parents=True)
    (folder / LAST_CHECKPOINT).write_bytes(b"checkpoint")
    os.utime(folder / LAST_CHECKPOINT, (mtime, mtime))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if finished:
        (folder / "metrics.json").write_text("{}")
    return folder


def test_find_resumable_run_picks_the_newest_unfinished_run_of_this_config(tmp_path, data_dir):
    runs = tmp_path / "runs"

    def cfg_in(name: str, *extra: str):
        return compose_config([*COMMAND, *extra], runs / name, data_dir)

    _fake_run(runs / "old", cfg_in("old"), mtime=1_000)
    wanted = _fake_run(runs / "newer", cfg_in("newer"), mtime=2_000)
    _fake_run(runs / "finished", cfg_in("finished"), mtime=3_000, finished=True)
    _fake_run(runs / "other_lr", cfg_in("other_lr", "optimizer.lr=0.01"), mtime=4_000)
    (runs / "not_a_run").mkdir()
    rerun = cfg_in("rerun", "resume=auto")
    assert find_resumable_run(rerun, runs / "rerun") == wanted
    # A rerun into a folder that has its own last.ckpt continues that one.
    own = _fake_run(runs / "own", cfg_in("own"), mtime=500)
    assert find_resumable_run(cfg_in("own", "resume=auto"), own) == own
    # Nothing of this config: start afresh.
    assert find_resumable_run(cfg_in("fresh", "seed=7", "resume=auto"), runs / "fresh") is None


def test_find_resumable_run_skips_unreadable_configs(tmp_path, data_dir):
    runs = tmp_path / "runs"
    broken = _fake_run(runs / "broken", compose_config(COMMAND, runs / "broken", data_dir), mtime=1_000)
    (broken / "config.yaml").write_text("{ not: yaml: [")
    rerun = compose_config([*COMMAND, "resume=auto"], runs / "rerun", data_dir)
    assert find_resumable_run(rerun, runs / "rerun") is None


def test_resume_auto_resolves_a_new_config_in_the_continued_run_folder(tmp_path, data_dir):
    runs = tmp_path / "runs"
    # The earlier run saved the config it trained with: the resolved one.
    saved = resolve_run_config(compose_config([*COMMAND, "selection=last"], runs / "previous", data_dir)).cfg
    previous = _fake_run(runs / "previous", saved, mtime=1_000)
    rerun = compose_config([*COMMAND, "resume=auto", "selection=last"], runs / "rerun", data_dir)
    composed = OmegaConf.to_container(rerun)

    run = resolve_run_config(rerun)
    assert run.output_dir == previous and run.ckpt_setting == "resume=auto"
    assert run.ckpt_path == str(previous / LAST_CHECKPOINT)
    assert run.cfg.paths.output_dir == str(previous) and run.selection == "last"
    # Paths inside the run folder follow it; selection=last trained on every training class.
    assert run.cfg.callbacks.model_checkpoint.dirpath == f"{previous}/checkpoints"
    assert run.cfg.data.val_fraction == 0
    # The composed config is left as it was, and the resolved one cannot be changed afterwards.
    assert OmegaConf.to_container(rerun) == composed
    with pytest.raises(ReadonlyConfigError):
        run.cfg.seed = 5

    # Nothing to continue: the run starts afresh in its own folder.
    fresh = resolve_run_config(compose_config([*COMMAND, "resume=auto", "seed=3"], runs / "fresh", data_dir))
    assert fresh.output_dir == runs / "fresh" and fresh.ckpt_path is None
