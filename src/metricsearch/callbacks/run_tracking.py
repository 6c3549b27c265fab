"""Recording a run in its experiment loggers: the resolved config, and the best checkpoint as a W&B artifact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class RunTrackingCallback(Callback):
    """Logs the resolved run config to every logger, and uploads the best checkpoint to W&B when fitting ends.

    Lightning on its own records only the module's hyperparameters; the resolved Hydra config (data, loss, miner,
    sampler, optimizer, trainer...) is what makes a logged run reproducible, so it is read from the file the
    pipeline writes into the run folder before training and logged once, before the first fit or test. In W&B the
    summary of the checkpoint's monitored metric is set to its best value, which is what sweeps compare.

    Args:
        config_file: The resolved config (``<run>/config.yaml``); nothing is logged if it does not exist.
        log_best_checkpoint: Upload the best checkpoint as a W&B ``model`` artifact (aliases ``best``, ``latest``)
            when a ``WandbLogger`` is in use.
        artifact_name: The artifact's name; ``model-<wandb run id>`` by default.
    """

    def __init__(
        self, config_file: str | Path | None = None, log_best_checkpoint: bool = True, artifact_name: str | None = None
    ) -> None:
        super().__init__()
        self.config_file = Path(config_file) if config_file else None
        self.log_best_checkpoint = log_best_checkpoint
        self.artifact_name = artifact_name
        self._config_logged = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._config_logged:
            return
        self._config_logged = True
        if self.config_file is not None and self.config_file.is_file():
            config = yaml.safe_load(self.config_file.read_text(encoding="utf-8")) or {}
            for logger in trainer.loggers:
                logger.log_hyperparams(config)
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is None or not checkpoint.monitor:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # The run summary (what W&B tables and sweeps rank runs by) keeps the best value of the monitored
                # metric rather than the last one.
                logger.experiment.define_metric(
                    checkpoint.monitor,
                    step_metric="trainer/global_step",
                    summary="max" if checkpoint.mode == "max" else "min",
                )

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_best_checkpoint:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if not loggers or checkpoint is None:
            return
        # Without a monitored metric (e.g. no validation set) the latest checkpoint is the best there is.
        path = checkpoint.best_model_path or checkpoint.last_model_path
        if not path or not Path(path).is_file():
            log.warning("No checkpoint file to upload to W&B (best_model_path=%r)", checkpoint.best_model_path)
            return
        for logger in loggers:
            log_checkpoint_artifact(logger, path, checkpoint, self.artifact_name, epoch=trainer.current_epoch)


def log_checkpoint_artifact(
    logger: WandbLogger, path: str | Path, checkpoint: ModelCheckpoint, name: str | None = None, **metadata: Any
) -> None:
    """Logs one checkpoint file as a W&B ``model`` artifact with the checkpoint callback's score in its metadata.

    Offline, the artifact is recorded in the run's ``.wandb`` file and ``wandb sync`` uploads the file later.
    """
    import wandb

    run = logger.experiment
    score = checkpoint.best_model_score
    artifact = wandb.Artifact(
        name=name or f"model-{run.id}",
        type="model",
        metadata={
            "monitor": checkpoint.monitor,
            "mode": checkpoint.mode,
            "score": float(score) if score is not None else None,
            "original_filename": Path(path).name,
            **metadata,
        },
    )
    # NOTE: "immutable" references the file in place instead of staging a copy (a checkpoint is tens to hundreds of
    # MB); the best checkpoint of a finished fit is never rewritten, and offline it stays in the run folder that
    # `wandb sync` uploads it from.
    artifact.add_file(str(path), name="model.ckpt", policy="immutable")
    run.log_artifact(artifact, aliases=["best", "latest"])
