"""The training-loss curve as a picture in the run folder (``plots/loss_curve.png``) and a table beside it.

W&B and the CSV logger already record ``train/loss`` at every logged step; this callback keeps the curve where a
run's other pictures are, redrawn after every epoch, so a run can be judged without opening a dashboard. The
history travels in the checkpoints (Lightning saves a callback's ``state_dict``), so a resumed run's curve starts at
step 0, not at the resume.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure

from metricsearch.analysis.files import save_figure, write_csv

LOSS_KEY = "train/loss"


class LossCurveCallback(Callback):
    """Records ``train/loss`` after every training batch and draws it after every epoch (rank zero only).

    Args:
        output_dir: The run folder (``plots/loss_curve.png``, ``tables/loss_curve.csv``); default: the trainer's
            ``default_root_dir``.
        smoothing: Window (in steps) of the moving average drawn over the raw values.
    """

    def __init__(self, output_dir: str | Path | None = None, smoothing: int = 50) -> None:
        super().__init__()
        if smoothing < 1:
            raise ValueError(f"callbacks.loss_curve.smoothing must be at least 1, got {smoothing}")
        self.output_dir = Path(output_dir) if output_dir else None
        self.smoothing = smoothing
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.epochs: list[int] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        value = trainer.callback_metrics.get(LOSS_KEY)
        # A skipped (non-finite) batch logs nothing new: record only batches that logged this step's loss.
        if value is None or outputs is None:
            return
        loss = float(value)
        if math.isfinite(loss):
            self.steps.append(int(trainer.global_step))
            self.losses.append(loss)
            self.epochs.append(int(trainer.current_epoch))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.losses:
            out = self.output_dir or Path(trainer.default_root_dir)
            save_figure(
                plot_loss_curve(self.steps, self.losses, self.epochs, self.smoothing), out / "plots" / "loss_curve.png"
            )
            rows = [
                {"step": s, "epoch": e, "loss": round(v, 6)}
                for s, e, v in zip(self.steps, self.epochs, self.losses, strict=True)
            ]
            write_csv(out / "tables" / "loss_curve.csv", rows)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "losses": list(self.losses), "epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state_dict.get("steps", [])]
        self.losses = [float(v) for v in state_dict.get("losses", [])]
        self.epochs = [int(e) for e in state_dict.get("epochs", [])]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of the last ``window`` values at every position (fewer at the start).

    Example:
        >>> moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist()
        [1.0, 2.0, 4.0, 6.0]
    """
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_loss_curve(steps: list[int], losses: list[float], epochs: list[int], smoothing: int = 50) -> Figure:
    """The raw per-step loss (faint), its moving average, and each epoch's mean at the epoch's last step."""
    steps_arr, losses_arr, epochs_arr = np.asarray(steps), np.asarray(losses), np.asarray(epochs)
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    axes.plot(steps_arr, losses_arr, color="tab:blue", alpha=0.25, linewidth=0.8, label="per step")
    axes.plot(steps_arr, moving_average(losses_arr, smoothing), color="tab:blue", label=f"mean of {smoothing} steps")
    epoch_ids = np.unique(epochs_arr)
    epoch_means = [losses_arr[epochs_arr == e].mean() for e in epoch_ids]
    epoch_ends = [steps_arr[epochs_arr == e].max() for e in epoch_ids]
    axes.plot(epoch_ends, epoch_means, "o-", color="tab:orange", markersize=4, label="epoch mean")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(f"Training loss: {len(losses_arr):,} steps, {len(epoch_ids)} epochs", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure
