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


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained with another model than the one this run builds."""


def check_checkpoint_matches(ckpt_path: str | Path, model_config: dict[str, Any]) -> None:
    """Refuses a checkpoint of another backbone or embedding size before Lightning fails on tensor shapes.

    Args:
        ckpt_path: the checkpoint to resume from.
        model_config: this run's ``MetricLearningModule`` model_config (backbone and head configs).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        CheckpointMismatchError: it holds another backbone or embedding size, or is no MetricSearch checkpoint.
    """
    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointMismatchError(f"cannot read checkpoint {path} ({err}); is it truncated or corrupt?") from err
    theirs = (checkpoint.get("hyper_parameters") or {}).get("model_config")
    if not theirs:
        raise CheckpointMismatchError(f"{path} is not a MetricSearch training checkpoint (no model_config inside)")
    mine = (model_config["backbone"]["model_name"], model_config["head"]["embedding_dim"])
    found = (theirs["backbone"]["model_name"], theirs["head"]["embedding_dim"])
    if mine != found:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds backbone {found[0]} with {found[1]}-d embeddings, but this run builds "
            f"{mine[0]} with {mine[1]}-d embeddings; pass the matching backbone=... head.embedding_dim=... "
            "or drop ckpt_path / resume to start afresh"
        )
