"""Finding the checkpoint to continue a run from after a crash or a kill (``resume=auto``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Keys that do not change what a run computes: a rerun that differs only in these is the same run.
_NOT_IDENTITY = ("paths", "resume", "ckpt_path", "hydra", "logger", "trainer.enable_progress_bar")
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
FINISHED_MARKER = "metrics.json"


def run_identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved config without the keys that only say where and how a run is recorded."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    for key in _NOT_IDENTITY:
        parent, _, leaf = key.rpartition(".")
        node = plain.get(parent, {}) if parent else plain
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


def find_resumable_run(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The run folder whose ``last.ckpt`` this run should continue, or None to start afresh.

    This run's own folder comes first (a rerun with the same ``hydra.run.dir``); otherwise the newest
    unfinished sibling run (no ``metrics.json`` yet) whose resolved config is the same as this one.
    """
    if (output_dir / LAST_CHECKPOINT).is_file():
        return output_dir
    parent = output_dir.parent
    if not parent.is_dir():
        return None
    identity = run_identity(cfg)
    candidates = [p for p in parent.iterdir() if p != output_dir and (p / LAST_CHECKPOINT).is_file()]
    for run in sorted(candidates, key=lambda p: (p / LAST_CHECKPOINT).stat().st_mtime, reverse=True):
        if (run / FINISHED_MARKER).exists() or not (run / "config.yaml").is_file():
            continue
        if run_identity(OmegaConf.load(run / "config.yaml")) == identity:
            return run
    return None
