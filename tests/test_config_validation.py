"""Impossible settings are refused right after composing, before any data, model or evaluation, in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import DictConfig, OmegaConf

from metricsearch.pipelines.run_config import resolve_run_config
from metricsearch.utils.config import CONFIG_DIR, ConfigError, check_group_options, validate_config
from tests.helpers import REPO_ROOT, TINY, compose_config, run_train

# (overrides, what the one-line message must say). The first five are the settings of the outside probe.
BAD_SETTINGS = [
    (
        ["data.batch_size=7"],
        "data.batch_size=7 is not divisible by sampler.m=4: every batch holds m images of each of batch_size/m "
        "classes; set data.batch_size to a multiple of 4 (e.g. data.batch_size=8)",
    ),
    (
        ["sampler.m=1000"],
        "sampler.m=1000 is larger than data.batch_size=16: every batch holds m images of each of batch_size/m "
        "classes; lower sampler.m to a divisor of 16, e.g. sampler.m=4",
    ),
    (["optimizer.lr=abc"], "optimizer.lr=abc is not a number; set e.g. optimizer.lr=0.001"),
    (["data.batch_size=0"], "data.batch_size=0 must be at least 1; set e.g. data.batch_size=64"),
    (["head.embedding_dim=0"], "head.embedding_dim=0 must be at least 1; set e.g. head.embedding_dim=128"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 must be greater than 0; set e.g. optimizer.lr=0.001"),
    (["data.batch_size=7.5"], "data.batch_size=7.5 is not a whole number; set e.g. data.batch_size=64"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5 must be below 1"),
    (["sampler.m=0"], "sampler.m=0 must be at least 1"),
    (
        ["data.batch_size=18"],
        "data.batch_size=18 is not divisible by sampler.m=4: every batch holds m images of each of batch_size/m "
        "classes; set data.batch_size to a multiple of 4 (e.g. data.batch_size=16) or sampler.m to a divisor of 18 "
        "(e.g. sampler.m=3)",
    ),
    (["resume=never"], "resume=never does not exist; resume takes null (start afresh), auto (continue an"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt does not exist"),
    (["seed=-1"], "seed=-1 must be at least 0; set e.g. seed=42"),
    (["seed=4294967296"], "seed=4294967296 is over 4294967295 (numpy's largest seed, 2**32 - 1)"),
    (["optimizer.lr=nan"], "optimizer.lr=nan is not a finite number; set e.g. optimizer.lr=0.001"),
    (["optimizer.weight_decay=inf"], "optimizer.weight_decay=inf is not a finite number"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_validate_config_names_the_setting_and_the_fix(overrides, message, tmp_path, data_dir):
    cfg = compose_config(overrides, tmp_path, data_dir)
    with pytest.raises(ConfigError) as caught:
        validate_config(cfg)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def _leaves(mapping: dict, path: tuple = ()):
    """(path of keys, value) of every leaf of a nested mapping."""
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_is_valid(experiment, tmp_path, data_dir):
    cfg = compose_config([f"experiment={experiment}"], tmp_path, data_dir, tiny=False)
    # The experiment's settings apply to the run (`# @package _global_`), not under an `experiment` key.
    assert "experiment" not in cfg
    settings = OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml")
    composed = OmegaConf.to_container(cfg)
    for path, value in _leaves(OmegaConf.to_container(settings)):
        if path[0] != "defaults" and not (isinstance(value, str) and "${" in value):
            node = composed
            for key in path:
                node = node[key]
            assert node == value, path
    # It passes validation and resolves into the run's config.
    run = resolve_run_config(cfg)
    assert run.selection == (cfg.get("selection") or "val") and run.output_dir == tmp_path


@pytest.mark.parametrize(
    "overrides",
    [[], ["sampler=random"], ["sampler=null"], ["sampler.m=8"], ["optimizer=sgd"], ["scheduler=null"], ["resume=auto"]],
)
def test_valid_settings_pass(overrides, tmp_path, data_dir):
    for tiny in (True, False):
        cfg = compose_config(overrides, tmp_path, data_dir, tiny=tiny)
        # Each setting is in the config that is validated.
        for override in overrides:
            key, value = override.split("=", 1)
            node = OmegaConf.select(cfg, key)
            if value == "null":
                assert node is None, override
            elif "." in key or not isinstance(node, DictConfig):
                assert str(node) == value, override
            else:
                assert value in str(node._target_).lower(), override
        composed = OmegaConf.to_container(cfg)
        # Passes, and checking changes nothing.
        validate_config(cfg)
        assert OmegaConf.to_container(cfg) == composed


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS[:5], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_train_refuses_a_bad_setting_before_any_work(overrides, message, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = run_train(overrides, run_dir, data_dir)
    assert result.returncode != 0
    # One line, the message, no traceback: before the fix these surfaced inside trainer.fit after the untrained
    # evaluation, as 48-65 lines of TypeError / ZeroDivisionError.
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (run_dir / "untrained_metrics.json").exists() and not (run_dir / "checkpoints").exists()
    assert "Testing" not in result.stdout + result.stderr


def test_m_larger_than_a_class_stops_before_the_untrained_evaluation(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = run_train(["sampler.m=16", "data.batch_size=32"], run_dir, data_dir)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: sampler.m=16 is larger than the smallest training class (8 images")
    )
    assert "lower sampler.m to at most 8 or set sampler.replacement=true" in result.stderr
    assert not (run_dir / "untrained_metrics.json").exists()
    assert "Testing" not in result.stdout + result.stderr


def test_multirun_names_the_failing_job_without_a_traceback(tmp_path, data_dir):
    """Under -m (and Optuna) a bad setting fails its job through Hydra, which names the job's overrides."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", "-m", *TINY, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(
        [*cmd, "data.batch_size=7,9"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "Error executing job with overrides:" in result.stderr and "'data.batch_size=7'" in result.stderr
    assert "data.batch_size=7 is not divisible by sampler.m=4" in result.stderr


def test_group_options_are_names_of_their_group_never_paths():
    # What users and sweeps legitimately write passes.
    check_group_options(
        ["loss=triplet,contrastive", "loss=glob(*)", "+experiment=synthetic_triplet", "miner=null", "seed=3"]
        + ["data.root=/data/../cub", "hydra/launcher=basic", "ckpt_path=/runs/a/last.ckpt", "~logger"]
    )
    options = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml")))
    for override, message in [
        ("loss=doesnotexist", f"loss=doesnotexist is not an option of conf/loss ({options})"),
        ("loss=triplet,nope", "loss=nope is not an option of conf/loss"),
        ("+experiment=../../../../elsewhere/evil", "experiment=../../../../elsewhere/evil is a path, not an option"),
        ("loss=..\\x", "is a path, not an option name"),
        ("loss=/etc/passwd", "loss=/etc/passwd is a path"),
        ("hydra/launcher=../../x", "hydra/launcher=../../x is a path"),
        ("loss=glob(../*)", "is a path"),
    ]:
        with pytest.raises(ConfigError) as caught:
            check_group_options([override])
        assert message in str(caught.value) and "\n" not in str(caught.value)
