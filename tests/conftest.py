"""Shared fixtures: compose the real Hydra config, shrunk to seconds-long runs on tiny built-in data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from metricsearch.utils.config import CONFIG_DIR, normalize_overrides
from metricsearch.utils.config import REPO_ROOT as REPO_ROOT  # re-exported: the tests that run scripts use it

# Never reach the network from tests: timm's hub and W&B.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One cache of generated built-in data shared by the whole session."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A trained tiny checkpoint, its gallery and index (see ``tests.search_fixtures``), built once per session."""
    from tests.search_fixtures import tiny_search_setup  # imports torch and the search package: only when used

    return tiny_search_setup(tmp_path_factory.getbasetemp() / "search")


def run_train(args: list[str], run_dir: Path, data_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python train.py`` with the tiny settings, the test's data and run folder, and ``args``, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", *TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """The ``python3`` kernel of this interpreter (ipykernel installs it into ``<venv>/share/jupyter``), for the
    notebook tests."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True, capture_output=True)
    return "python3"
