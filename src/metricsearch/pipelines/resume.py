"""Finding the checkpoint to continue a run from after a crash or a kill (``resume=auto``)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from metricsearch.analysis.run_folder import CONFIG_FILE, LAST_CHECKPOINT, has_metrics

log = logging.getLogger(__name__)

# Settings that do not change what a run trains, only where it is written, how it is watched and what is evaluated
# around it: a rerun that differs only in these is the same run. Run-folder paths elsewhere in the config (the
# checkpoint folder, the trainer's root folder...) are replaced by RUN_FOLDER instead, see `run_identity`.
_NOT_IDENTITY = (
    "paths",
    "resume",
    "ckpt_path",
    "hydra",
    "task_name",
    "logger",
    "test_untrained",
    "test",
    "save_test_embeddings",
    "recipe",
    "optimized_metric",
    "callbacks.lr_monitor",
    "callbacks.throughput",
    "callbacks.run_tracking",
    "callbacks.visualization",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "data.num_workers",
    "data.eval_batch_size",
)
RUN_FOLDER = "<run folder>"
# A run's resolved config is a few kB; a larger config.yaml in a sibling folder is not one of ours.
_MAX_CONFIG_BYTES = 1 << 20


def run_identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """What a run trains: its resolved config without the settings that only say where and how it is recorded.

    Two runs with equal identities train the same model on the same data the same way, so ``resume=auto`` may
    continue one with the other. Every string that names a path inside the run's own folder
    (``paths.output_dir``) has that folder replaced by ``RUN_FOLDER``, so the same command run into another folder
    (a plain rerun gets a new timestamped one) has the same identity.

    Args:
        cfg: a composed config, or the plain dict of a run's saved ``config.yaml`` (already resolved).
    """
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))
    run_dir = (plain.get("paths") or {}).get("output_dir")
    for key in _NOT_IDENTITY:
        parent, _, leaf = key.rpartition(".")
        node = plain.get(parent) if parent else plain
        if isinstance(node, dict):
            node.pop(leaf, None)
    if isinstance(run_dir, str) and run_dir.rstrip("/"):
        plain = _replace_folder(plain, run_dir.rstrip("/"))
    return plain


def _replace_folder(value: Any, folder: str) -> Any:
    if isinstance(value, dict):
        return {k: _replace_folder(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_folder(v, folder) for v in value]
    if isinstance(value, str) and (value == folder or value.startswith(folder + "/")):
        return RUN_FOLDER + value[len(folder) :]
    return value


def _saved_identity(run: Path) -> dict[str, Any] | None:
    """The identity of the run saved in ``run/config.yaml``, or None when there is no readable one."""
    path = run / CONFIG_FILE
    try:
        if not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
            return None
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        log.warning("resume=auto: skipping %s, its config.yaml cannot be read (%s)", run, err)
        return None
    return run_identity(saved) if isinstance(saved, dict) else None


def find_resumable_run(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The run folder whose ``last.ckpt`` this run should continue, or None to start afresh.

    This run's own folder comes first (a rerun with the same ``hydra.run.dir``); otherwise the newest
    unfinished sibling run (no ``metrics.json`` yet) with the same :func:`run_identity` as this one.
    """
    if (output_dir / LAST_CHECKPOINT).is_file():
        return output_dir
    parent = output_dir.parent
    if not parent.is_dir():
        return None
    identity = run_identity(cfg)
    candidates = [p for p in parent.iterdir() if p != output_dir and (p / LAST_CHECKPOINT).is_file()]
    others = 0
    for run in sorted(candidates, key=lambda p: (p / LAST_CHECKPOINT).stat().st_mtime, reverse=True):
        if has_metrics(run):
            continue
        if _saved_identity(run) == identity:
            return run
        others += 1
    if others:
        log.info("resume=auto: %d unfinished run(s) under %s were trained with other settings", others, parent)
    return None


class CheckpointError(ValueError):
    """A checkpoint to resume from cannot be used; the message names the file and what to do instead."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was trained with another model than the one this run builds."""


def _start_afresh_advice(setting: str) -> str:
    if setting == "resume=auto":
        return "delete it (or move it away) and rerun, or run without resume=auto to start afresh"
    return f"pass another checkpoint as {setting}=..., or drop {setting} to start afresh"


def check_checkpoint_matches(ckpt_path: str | Path, model_config: dict[str, Any], setting: str = "ckpt_path") -> None:
    """Refuses a checkpoint of another backbone or embedding size before Lightning fails on tensor shapes.

    Args:
        ckpt_path: the checkpoint to resume from.
        model_config: this run's ``MetricLearningModule`` model_config (backbone and head configs).
        setting: what chose the checkpoint (``ckpt_path``, ``resume`` or ``resume=auto``), for the advice.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, or no MetricSearch training checkpoint.
        CheckpointMismatchError: it holds another backbone or embedding size.
    """
    import torch

    from metricsearch.utils.checkpoint_io import unreadable_checkpoint_reason

    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"{setting}={ckpt_path} does not exist; {_start_afresh_advice(setting)}")
    try:
        # weights_only: a checkpoint is data; loading it never runs code named inside it.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(
            f"cannot read checkpoint {path}: {unreadable_checkpoint_reason(path, err)}; {_start_afresh_advice(setting)}"
        ) from None
    theirs = (checkpoint.get("hyper_parameters") or {}).get("model_config") if isinstance(checkpoint, dict) else None
    if not isinstance(theirs, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a MetricSearch training checkpoint (no model_config or state_dict inside); "
            f"{_start_afresh_advice(setting)}"
        )
    mine, found = _model_of(model_config), _model_of(theirs)
    if mine != found:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds backbone {found[0]} with {found[1]}-d embeddings, but this run builds "
            f"{mine[0]} with {mine[1]}-d embeddings; pass the matching backbone=... head.embedding_dim=..., "
            f"or {_start_afresh_advice(setting)}"
        )


def _model_of(model_config: dict[str, Any]) -> tuple[Any, Any]:
    """(backbone name, embedding size) of a model_config; the backbone's target when it has no timm name."""
    backbone = model_config.get("backbone") or {}
    head = model_config.get("head") or {}
    if not isinstance(backbone, dict) or not isinstance(head, dict):
        return None, None
    return backbone.get("model_name") or backbone.get("_target_"), head.get("embedding_dim")
