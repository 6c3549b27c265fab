"""Training throughput in images per second, logged once per epoch as ``train/images_per_sec``."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from metricsearch.data.dataset import IMAGE


class ThroughputCallback(Callback):
    """Logs how many training images per second the whole run (all processes) processed in each epoch.

    The clock runs from the start of the epoch to the end of its last training batch, so data loading, forward,
    backward and optimizer steps count, and the validation that follows the epoch does not.
    """

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None
        self._end: float | None = None
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._end, self._images = time.perf_counter(), None, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += _batch_size(batch)
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None or self._end is None or self._end <= self._start or self._images == 0:
            return
        # Every process trains on its own batches, so the run's throughput is the per-process rate times their number.
        rate = self._images * trainer.world_size / (self._end - self._start)
        pl_module.log("train/images_per_sec", rate, on_step=False, on_epoch=True, rank_zero_only=True)


def _batch_size(batch: Any) -> int:
    """Number of images in a batch dict (or the length of any other batch)."""
    if isinstance(batch, dict) and IMAGE in batch:
        return len(batch[IMAGE])
    try:
        return len(batch)
    except TypeError:
        return 0
