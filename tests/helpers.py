"""What the tests share besides fixtures: the tiny run settings, the composed config of a run, and a run of
``python train.py`` as a user starts it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from metricsearch.utils.config import CONFIG_DIR, normalize_overrides
from metricsearch.utils.config import REPO_ROOT as REPO_ROOT  # re-exported: the tests that run scripts use it

# Tiny settings used by every test run (seconds on two cores).
TINY = [
    "data.source.num_classes=12",
    "data.source.images_per_class=8",
    "data.source.image_size=32",
    "data.image_size=32",
    "data.resize_size=32",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.num_workers=0",
    "data.val_fraction=0.34",
    "head.embedding_dim=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    # The default run's wall-clock guard would stop a test's run early on a slow or loaded machine.
    "trainer.max_time=null",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def compose_config(overrides: list[str], output_dir: Path, data_dir: Path, tiny: bool = True) -> DictConfig:
    """The config `python train.py OVERRIDES` would run, with paths pointed into the test's folders."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=normalize_overrides((TINY if tiny else []) + overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(data_dir)
    return cfg


def run_train(args: list[str], run_dir: Path, data_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python train.py`` with the tiny settings, the test's data and run folder, and ``args``, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", *TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
