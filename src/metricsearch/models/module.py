"""One Lightning module for every loss: embeds a batch, mines, computes the loss; evaluates retrieval."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from metricsearch.data.dataset import IMAGE, INDEX, LABEL
from metricsearch.metrics import CollectedEmbeddings, RetrievalMetric
from metricsearch.models.head import EmbeddingModel


class NonFiniteLossError(RuntimeError):
    """Training produced NaN / inf losses too many times in a row."""


class MetricLearningModule(L.LightningModule):
    """Trains an :class:`EmbeddingModel` with a pytorch-metric-learning loss and optional miner.

    Validation and test compute Recall@K, MAP@R, R-Precision and NMI once over the whole split, from the
    embeddings gathered (across processes) in a :class:`RetrievalMetric`.

    Args:
        model: backbone + head.
        loss: a pytorch-metric-learning loss. It is a submodule, so learnable proxies are saved, restored
            and optimized with the rest.
        miner: a pytorch-metric-learning miner, or None to use every pair / triplet the loss forms.
        optimizer: a partial optimizer constructor taking parameter groups.
        scheduler: a partial LR scheduler constructor taking the optimizer, or None.
        loss_lr_multiplier: learning rate of the loss's own parameters relative to the model's (proxy
            methods use ~100x).
        recall_at_k: the K of Recall@K.
        compute_nmi: also compute NMI (a k-means per evaluation).
        model_config: plain dict describing how to rebuild the model and its preprocessing; stored in the
            checkpoint so search and export can load it without the training config.
        max_nonfinite_steps: training stops after this many non-finite losses in a row; isolated ones are
            skipped (no update) and counted in ``train/nonfinite_steps``.
    """

    def __init__(
        self,
        model: EmbeddingModel,
        loss: nn.Module,
        miner: nn.Module | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        loss_lr_multiplier: float = 1.0,
        recall_at_k: Sequence[int] = (1, 2, 4, 8),
        compute_nmi: bool = True,
        model_config: dict | None = None,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "loss", "miner", "optimizer", "scheduler"])
        self.model = model
        self.loss = loss
        self.miner = miner
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_metric = RetrievalMetric(recall_at_k=list(recall_at_k), compute_nmi=compute_nmi)
        self.test_metric = RetrievalMetric(recall_at_k=list(recall_at_k), compute_nmi=compute_nmi)
        # The prefix under which test metrics are logged; the pipeline tests the untrained model as "untrained".
        self.test_prefix = "test"
        # The embeddings of the latest evaluation per prefix (all ranks gathered), for callbacks that draw
        # projections and retrieval grids after ``on_validation_end`` / ``on_test_end``.
        self.last_evaluation: dict[str, CollectedEmbeddings] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        # BatchNorm updates its running statistics in the forward pass, before the loss can be checked: keep a
        # copy (a few KB) so that a non-finite batch leaves no NaN behind in the buffers either.
        buffers = [b.detach().clone() for b in self.model.buffers()]
        embeddings = self.model(batch[IMAGE])
        labels = batch[LABEL]
        indices_tuple = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss(embeddings, labels, indices_tuple)
        batch_size = len(labels)
        if not torch.isfinite(loss):
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
            return self._skip_nonfinite(loss, batch_idx)
        self.nonfinite_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if indices_tuple is not None:
            self.log("train/mined", float(len(indices_tuple[0])), batch_size=batch_size)
        return loss

    def _skip_nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Skips the update of a NaN / inf loss; stops training when they keep coming.

        Returning None from ``training_step`` makes Lightning skip backward and the optimizer step, so one bad
        batch does not poison the weights. Many in a row mean the run diverged: stop with a clear message,
        leaving the checkpoints written so far untouched.
        """
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), reduce_fx="max")
        limit = self.hparams.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"the loss was {loss.item()} for {self.nonfinite_in_a_row} steps in a row "
                f"(epoch {self.current_epoch}, batch {batch_idx}, {self.nonfinite_steps} non-finite steps in all): "
                "training diverged and was stopped. The checkpoints written before are intact (resume with "
                "ckpt_path=.../last.ckpt). Lower optimizer.lr, set trainer.gradient_clip_val, or raise "
                "module.max_nonfinite_steps to tolerate more."
            )
        return None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_metric.update(self.model(batch[IMAGE]), batch[LABEL], batch[INDEX])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.test_metric.update(self.model(batch[IMAGE]), batch[LABEL], batch[INDEX])

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval(self.val_metric, "val")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval(self.test_metric, self.test_prefix)

    def _log_retrieval(self, metric: RetrievalMetric, prefix: str) -> None:
        values = metric.compute()
        with metric.sync_context():
            self.last_evaluation[prefix] = metric.collected()
        self.last_metrics[prefix] = values
        metric.reset()
        # Values are already computed over every process's embeddings, so no further reduction is needed.
        self.log_dict({f"{prefix}/{name}": float(value) for name, value in values.items()}, sync_dist=False)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_params:
            lr = optimizer.defaults["lr"] * self.hparams.loss_lr_multiplier
            optimizer.add_param_group({"params": loss_params, "lr": lr})
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
