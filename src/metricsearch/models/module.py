"""One Lightning module for every loss: embeds a batch, mines, computes the loss; evaluates retrieval."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch import nn

from metricsearch.data.dataset import IMAGE, INDEX, LABEL
from metricsearch.metrics import CollectedEmbeddings, RetrievalMetric
from metricsearch.models.embedding_model import EmbeddingModel


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
        nmi_max_macs: budget of NMI's k-means on the CPU, in multiply-adds (None: unlimited); over it NMI uses
            fewer runs, then fewer iterations, then is left out (see ``metricsearch.metrics.kmeans``).
        model_config: how to rebuild the model and its preprocessing (``ModelConfig.to_dict()``); stored in the
            checkpoint so search and export can load it without the training config.
        max_nonfinite_steps: training stops after this many non-finite losses in a row; isolated ones are
            skipped (no update) and counted in ``train/nonfinite_steps``.
        channels_last: keep the model and its inputs in channels-last memory format (faster convolutions with
            bf16 / fp16 on tensor cores).
        compile: ``torch.compile`` the model (in place, so checkpoints keep their keys); true for the default
            backend (inductor), or a backend name (e.g. ``"eager"`` to check a setup quickly).
        gather_across_ranks: under multi-process training, let the loss and miner see the embeddings of every
            process (pytorch-metric-learning's distributed wrappers), so pairs and triplets are mined over the
            global batch, as in one process with the global batch.
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
        nmi_max_macs: float | None = None,
        model_config: dict | None = None,
        max_nonfinite_steps: int = 10,
        channels_last: bool = False,
        compile: bool | str = False,
        gather_across_ranks: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "loss", "miner", "optimizer", "scheduler"])
        self.model = model
        self.loss = loss
        self.miner = miner
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        metric_options = {"recall_at_k": list(recall_at_k), "compute_nmi": compute_nmi, "nmi_max_macs": nmi_max_macs}
        self.val_metric = RetrievalMetric(**metric_options)
        self.test_metric = RetrievalMetric(**metric_options)
        # The prefix under which test metrics are logged; the pipeline tests the untrained model as "untrained".
        self.test_prefix = "test"
        # The embeddings of the latest evaluation per prefix (all ranks gathered), for callbacks that draw
        # projections and retrieval grids after ``on_validation_end`` / ``on_test_end``.
        self.last_evaluation: dict[str, CollectedEmbeddings] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        # The loss and miner as called in training: wrapped to gather all processes' embeddings under DDP. A plain
        # dict, so the wrappers are not submodules and checkpoints keep the same keys with and without DDP.
        self._train_parts: dict[str, nn.Module | None] = {"loss": loss, "miner": miner}
        self._ranks_checked = False
        # The factor by which the cross-rank loss wrapper scales the loss (the world size once wrapped).
        self._loss_scale = 1
        self._compiled = False

    def setup(self, stage: str) -> None:
        """Applies the memory-format, compile and cross-process options once the process group exists."""
        if self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            backend = self.hparams.compile if isinstance(self.hparams.compile, str) else "inductor"
            # NOTE: Module.compile() compiles in place; torch.compile(module) would wrap it and prefix every
            # checkpoint key with "_orig_mod.".
            self.model.compile(backend=backend)
            self._compiled = True
        if dist.is_available() and dist.is_initialized() and not self._ranks_checked:
            self._wrap_for_ranks(dist.get_world_size())

    def _wrap_for_ranks(self, world_size: int) -> None:
        """Makes the loss and miner see the embeddings of every rank (pytorch-metric-learning's wrappers).

        With ``efficient=False`` every rank computes the loss over the gathered batch, with gradients flowing
        into its own embeddings only, and the wrapper multiplies the loss by the world size, so that DDP's
        averaging of gradients yields the gradient of the global-batch loss. (``efficient=True`` would use only
        the local embeddings as anchors, which proxy losses do not support.) The loss's own parameters (proxies,
        class weights) see the whole loss on every rank, so the multiplication would scale their averaged
        gradient by the world size: a hook divides it back.
        """
        self._ranks_checked = True
        if world_size <= 1 or not self.hparams.gather_across_ranks:
            return
        if not isinstance(self.loss, BaseMetricLossFunction):
            warnings.warn(
                f"{type(self.loss).__name__} is not a pytorch-metric-learning loss: each process computes it on its "
                "own batch only",
                stacklevel=2,
            )
            return
        self._train_parts["loss"] = DistributedLossWrapper(self.loss, efficient=False)
        if self.miner is not None and isinstance(self.miner, BaseMiner):
            self._train_parts["miner"] = DistributedMinerWrapper(self.miner, efficient=False)
        self._loss_scale = world_size
        for parameter in self.loss.parameters():
            if parameter.requires_grad:
                parameter.register_hook(lambda grad: grad / world_size)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self._inputs(images))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        # BatchNorm updates its running statistics in the forward pass, before the loss can be checked: keep a
        # copy (a few KB) so that a non-finite batch leaves no NaN behind in the buffers either.
        buffers = [b.detach().clone() for b in self.model.buffers()]
        embeddings = self.model(self._inputs(batch[IMAGE]))
        labels = batch[LABEL]
        miner, loss_fn = self._train_parts["miner"], self._train_parts["loss"]
        indices_tuple = miner(embeddings, labels) if miner is not None else None
        loss = loss_fn(embeddings, labels, indices_tuple)
        batch_size = len(labels)
        if not torch.isfinite(loss):
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
            return self._skip_nonfinite(loss, batch_idx)
        self.nonfinite_in_a_row = 0
        # The cross-rank wrapper scales the loss by the world size (see _wrap_for_ranks); log the loss itself.
        self.log("train/loss", loss.detach() / self._loss_scale, prog_bar=True, batch_size=batch_size)
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
        self.val_metric.update(self(batch[IMAGE]), batch[LABEL], batch[INDEX])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.test_metric.update(self(batch[IMAGE]), batch[LABEL], batch[INDEX])

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
