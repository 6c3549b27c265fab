"""One Lightning module for every loss: embeds a batch, mines, computes the loss; evaluates retrieval."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch import nn

from metricsearch.data.dataset import IMAGE, INDEX, LABEL
from metricsearch.metrics import CollectedEmbeddings, RetrievalMetric
from metricsearch.metrics.postprocess import PostprocessSettings
from metricsearch.models.embedding_model import EmbeddingModel
from metricsearch.models.losses import ProjectCrossBatchMemory
from metricsearch.utils.config import ConfigError

# The parts of the model that get their own optimizer parameter group (``lr_multipliers``); the loss's parameters
# form a third group with ``loss_lr_multiplier``.
MODEL_PARTS = ("backbone", "head")
SCHEDULER_INTERVALS = ("epoch", "step", "validation")


class NonFiniteLossError(RuntimeError):
    """Training produced NaN / inf losses too many times in a row."""


class XBMConfigError(ConfigError):
    """Cross-batch memory asked of a loss it cannot wrap, or a memory smaller than the global batch."""


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
        warmup_epochs: for this many first epochs the backbone is frozen (no gradient, all its layers in eval mode,
            so BatchNorm statistics stay put) while the head and the loss's parameters train; then it is released
            (Proxy-Anchor's ``--warm``). Its parameters are in the optimizer throughout: without a gradient
            the optimizer neither steps nor decays them, and their state starts when they first train.
        lr_multipliers: learning rate of the backbone's and the head's parameters relative to the optimizer's
            (keys ``backbone`` and ``head``, each 1.0 when left out). Each part is its own parameter group, named
            after it; parameters that do not train (``requires_grad`` false) are in none.
        scheduler_interval: step the scheduler every ``epoch`` or every optimizer ``step`` (milestones in
            iterations), or after every ``validation`` with the value of ``scheduler_metric`` (a plateau scheduler,
            ``ReduceLROnPlateau``, as the official XBM code steps it after each evaluation).
        scheduler_metric: with ``scheduler_interval=validation``, the evaluation metric (``recall@1``, ``map@r``,
            ...) under the evaluation's prefix (``val``, or ``test_epoch`` under ``selection=test_best``).
        xbm_memory_size: cross-batch memory (XBM, Wang et al. 2020): the pair loss also compares the batch with
            the embeddings of this many recent training images (pytorch-metric-learning's ``CrossBatchMemory``;
            the miner mines against the memory). 0 turns it off. Under DDP the memory receives every process's
            embeddings, in rank order, so it is the same on every process. Not saved in checkpoints: a resumed
            run refills it within ``xbm_memory_size / global batch`` steps.
        xbm_start_step: optimizer steps trained without the memory first (XBM fills it only once the embeddings
            have settled: its paper's warm-up of iterations).
        xbm_add_batch_loss: with the memory on, the loss is the batch's loss against itself plus its loss against
            the memory (which holds the batch too), as the official XBM code adds them; false: the memory loss only
            (pytorch-metric-learning's ``CrossBatchMemory`` alone).
        postprocess: the test evaluations' post-processing (``method``: none, aqe, dba or k_reciprocal, and its
            parameters; see ``metricsearch.metrics.postprocess``); validation is never post-processed.
        verification_fmrs: false match rates at which test evaluations also report the FNMR over every pair
            (``fnmr@fmr=0.001``); empty for none.
        val_prefix: the prefix the per-epoch evaluation is logged under: ``val``, or ``test_epoch`` when it runs on
            the test classes (``selection=test_best``; see ``metricsearch.pipelines.selection``).
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
        warmup_epochs: int = 0,
        lr_multipliers: Mapping[str, float] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_metric: str | None = None,
        xbm_memory_size: int = 0,
        xbm_start_step: int = 0,
        xbm_add_batch_loss: bool = False,
        postprocess: Mapping[str, Any] | None = None,
        verification_fmrs: Sequence[float] = (),
        val_prefix: str = "val",
    ) -> None:
        super().__init__()
        unknown = set(lr_multipliers or {}) - set(MODEL_PARTS)
        if unknown:
            raise ConfigError(
                f"module.lr_multipliers has {', '.join(sorted(unknown))}: its keys are {' and '.join(MODEL_PARTS)} "
                "(the loss's multiplier is loss.lr_multiplier)"
            )
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ConfigError(f"scheduler.interval={scheduler_interval} must be epoch, step or validation")
        if (scheduler_interval == "validation") != (scheduler_metric is not None):
            raise ConfigError(
                "scheduler.metric names the evaluation metric a plateau scheduler follows: set it together with "
                f"scheduler.interval=validation (got interval {scheduler_interval}, metric {scheduler_metric})"
            )
        lr_multipliers = {part: float((lr_multipliers or {}).get(part, 1.0)) for part in MODEL_PARTS}
        self.save_hyperparameters(ignore=["model", "loss", "miner", "optimizer", "scheduler"])
        self.model = model
        self.loss = loss
        self.miner = miner
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        metric_options = {"recall_at_k": list(recall_at_k), "compute_nmi": compute_nmi, "nmi_max_macs": nmi_max_macs}
        self.val_metric = RetrievalMetric(**metric_options)
        # Only test evaluations are post-processed and scored for verification: checkpoint selection stays on the
        # plain embeddings, and the pair scan runs once per evaluation, not every epoch.
        try:
            postprocess_settings = PostprocessSettings.from_mapping(dict(postprocess or {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from err
        self.test_metric = RetrievalMetric(
            **metric_options, postprocess=postprocess_settings, verification_fmrs=list(verification_fmrs)
        )
        # The prefix under which test metrics are logged; the pipeline tests the untrained model as "untrained".
        self.test_prefix = "test"
        # The embeddings of the latest evaluation per prefix (all ranks gathered), for callbacks that draw
        # projections and retrieval grids after ``on_validation_end`` / ``on_test_end``.
        self.last_evaluation: dict[str, CollectedEmbeddings] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        # The verification curve of the latest test evaluation per prefix (None without verification_fmrs).
        self.last_verification: dict[str, Any] = {}
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        # The loss and miner as called in training: wrapped to gather all processes' embeddings under DDP. A plain
        # dict, so the wrappers are not submodules and checkpoints keep the same keys with and without DDP.
        self._train_parts: dict[str, nn.Module | None] = {"loss": loss, "miner": miner}
        self._ranks_checked = False
        # The factor by which the cross-rank loss wrapper scales the loss (the world size once wrapped).
        self._loss_scale = 1
        self._compiled = False
        # Backbone parameters that warm-up froze and will release (those that trained before it).
        self._backbone_frozen = False
        self._warmup_frozen: list[nn.Parameter] = []
        self._world_size = 1
        if xbm_memory_size:
            self._train_parts["xbm"] = _cross_batch_memory(loss, miner, model.embedding_dim, xbm_memory_size)

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
            self._world_size = dist.get_world_size()
            self._wrap_for_ranks(self._world_size)

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
        loss, scale, batch_size, mined = self.training_loss(batch)
        if not torch.isfinite(loss):
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
            return self._skip_nonfinite(loss, batch_idx)
        self.nonfinite_in_a_row = 0
        # The cross-rank wrappers scale the loss by the world size (see _wrap_for_ranks); log the loss itself.
        self.log("train/loss", loss.detach() / scale, prog_bar=True, batch_size=batch_size)
        if mined is not None:
            self.log("train/mined", float(mined), batch_size=batch_size)
        return loss

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int, int | None]:
        """The loss of a labelled batch, the factor the cross-rank wrapper scaled it by, the batch size, and how
        many tuples the miner chose (None without one). Other supervisions override this (conf/supervision)."""
        embeddings = self.model(self._inputs(batch[IMAGE]))
        labels = batch[LABEL]
        if "xbm" in self._train_parts and self.global_step >= self.hparams.xbm_start_step:
            loss, scale = self._cross_batch_loss(embeddings, labels)
            return loss, scale, len(labels), None
        miner, loss_fn = self._train_parts["miner"], self._train_parts["loss"]
        indices_tuple = miner(embeddings, labels) if miner is not None else None
        mined = len(indices_tuple[0]) if indices_tuple is not None else None
        return loss_fn(embeddings, labels, indices_tuple), self._loss_scale, len(labels), mined

    def _cross_batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The loss of the batch against the cross-batch memory, and the factor it is scaled by.

        Under DDP the memory takes the embeddings of every rank, concatenated in rank order, so that each rank
        enqueues the same rows in the same places. (pytorch-metric-learning 2.9's ``DistributedLossWrapper`` puts
        the calling rank's first, so the ranks' memories end up in different orders: its issue #639.) As with
        the other losses (see :meth:`_wrap_for_ranks`), each rank computes the loss of the global batch with
        gradients into its own embeddings only, scaled by the world size for DDP's averaging.
        """
        memory = self._train_parts["xbm"]
        world_size = self._world_size
        if world_size > 1:
            embeddings, labels = _gather_in_rank_order(embeddings, labels)
        if len(embeddings) > memory.memory_size:
            raise XBMConfigError(
                f"module.xbm_memory_size={memory.memory_size} is smaller than the global batch ({len(embeddings)} "
                f"embeddings): the memory must hold at least one batch of every process; raise module.xbm_memory_size"
            )
        loss = memory(embeddings, labels)
        if self.hparams.xbm_add_batch_loss:
            loss = loss + self.loss(embeddings, labels)
        return loss * world_size, world_size

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

    def on_validation_epoch_start(self) -> None:
        self.val_metric.num_queries = self._datamodule_query_count("val_num_queries")

    def on_test_epoch_start(self) -> None:
        self.test_metric.num_queries = self._datamodule_query_count("test_num_queries")

    def _datamodule_query_count(self, name: str) -> int | None:
        """How many of the loader's first images are queries searched in the rest (query/gallery protocol), as the
        datamodule says; None (a self-search) when there is no datamodule or it does not say."""
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, name, None)

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval(self.val_metric, self.hparams.val_prefix)
        self._step_plateau_scheduler()

    def _step_plateau_scheduler(self) -> None:
        """Steps a ``scheduler.interval=validation`` scheduler with the metric just evaluated (not in the sanity
        check, which evaluates an untrained model on two batches)."""
        scheduler = getattr(self, "_validation_scheduler", None)
        if scheduler is None or self.trainer.sanity_checking:
            return
        values = self.last_metrics.get(self.hparams.val_prefix, {})
        metric = self.hparams.scheduler_metric
        if metric not in values:
            raise ConfigError(
                f"scheduler.metric={metric} is not an evaluation metric; it is one of {', '.join(sorted(values))}"
            )
        scheduler.step(float(values[metric]))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        scheduler = getattr(self, "_validation_scheduler", None)
        if scheduler is not None:
            checkpoint["validation_scheduler"] = scheduler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._validation_scheduler_state = checkpoint.get("validation_scheduler")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval(self.test_metric, self.test_prefix)

    def _log_retrieval(self, metric: RetrievalMetric, prefix: str) -> None:
        values = metric.compute()
        with metric.sync_context():
            self.last_evaluation[prefix] = metric.collected()
        self.last_metrics[prefix] = values
        self.last_verification[prefix] = getattr(metric, "last_verification", None)
        metric.reset()
        # Values are already computed over every process's embeddings, so no further reduction is needed.
        self.log_dict({f"{prefix}/{name}": float(value) for name, value in values.items()}, sync_dist=False)

    def on_train_epoch_start(self) -> None:
        # Decided from the epoch, so that a run resumed during or after the warm-up freezes or releases alike.
        self._freeze_backbone(self.current_epoch < self.hparams.warmup_epochs)

    def on_fit_end(self) -> None:
        self._freeze_backbone(False)

    def _freeze_backbone(self, frozen: bool) -> None:
        """Stops (or restarts) the backbone's training: no gradient, and eval mode for all its layers.

        Only parameters that trained before are released (a BatchNorm frozen by the backbone stays frozen).
        """
        if frozen == self._backbone_frozen:
            return
        if frozen:
            self._warmup_frozen = [p for p in self.model.backbone.parameters() if p.requires_grad]
        for parameter in self._warmup_frozen:
            parameter.requires_grad_(not frozen)
        if not frozen:
            self._warmup_frozen = []
        self._backbone_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> MetricLearningModule:
        # NOTE: Lightning calls train() at the start of fit and after every validation; the frozen backbone must
        # stay in eval mode through those, or its BatchNorm statistics would move during the warm-up.
        super().train(mode)
        if mode and getattr(self, "_backbone_frozen", False):
            self.model.backbone.eval()
        return self

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters as optimizer groups: backbone, head and loss, each with its lr multiplier.

        Every parameter that trains is in exactly one group; a part with none is left out. A frozen warm-up
        backbone is in its group (it is frozen only once training starts).
        """
        multipliers = self.hparams.lr_multipliers
        backbone = list(self.model.backbone.parameters())
        taken = {id(p) for p in backbone}
        parts = {
            "backbone": (backbone, multipliers["backbone"]),
            "head": ([p for p in self.model.parameters() if id(p) not in taken], multipliers["head"]),
            "loss": (list(self.loss.parameters()), self.hparams.loss_lr_multiplier),
        }
        groups = []
        for name, (parameters, multiplier) in parts.items():
            trainable = [p for p in parameters if p.requires_grad]
            if trainable:
                groups.append({"params": trainable, "name": name, "lr_multiplier": float(multiplier)})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        for group in optimizer.param_groups:
            group["lr"] = optimizer.defaults["lr"] * group["lr_multiplier"]
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        interval = self.hparams.scheduler_interval
        if interval == "validation":
            # Stepped by the module after each evaluation (see _step_plateau_scheduler), not by Lightning, whose
            # step-interval plateau stepping counts batches within the epoch rather than evaluations.
            state = getattr(self, "_validation_scheduler_state", None)
            if state is not None:
                scheduler.load_state_dict(state)
            self._validation_scheduler = scheduler
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def _cross_batch_memory(loss: nn.Module, miner: nn.Module | None, embedding_dim: int, size: int) -> CrossBatchMemory:
    """pytorch-metric-learning's ``CrossBatchMemory`` around a pair loss, with the miner mining against it."""
    name = type(loss).__name__
    if any(True for _ in loss.parameters()) or name not in ProjectCrossBatchMemory.supported_losses():
        raise XBMConfigError(
            f"module.xbm_memory_size={size} needs a pair loss, and loss {name} is a proxy or classification loss "
            f"or one CrossBatchMemory cannot wrap; use one of {', '.join(ProjectCrossBatchMemory.supported_losses())} "
            "(e.g. loss=contrastive or loss=multi_similarity), or set module.xbm_memory_size=0"
        )
    if miner is not None and not isinstance(miner, BaseMiner):
        raise XBMConfigError(
            f"module.xbm_memory_size needs a pytorch-metric-learning miner, not {type(miner).__name__}; set miner=null"
        )
    return ProjectCrossBatchMemory(loss, embedding_size=embedding_dim, memory_size=size, miner=miner)


def _gather_in_rank_order(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's embeddings and labels, rank 0's first; gradients flow into this rank's own embeddings.

    Ranks may hold batches of different sizes (a last, smaller batch): rows are padded to the largest for the
    collective and cut back after.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=labels.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(labels)], device=labels.device))
    largest = int(max(sizes).item())
    padded_embeddings = embeddings.new_zeros(largest, embeddings.shape[1])
    padded_embeddings[: len(embeddings)] = embeddings.detach()
    padded_labels = labels.new_zeros(largest)
    padded_labels[: len(labels)] = labels
    all_embeddings = [torch.empty_like(padded_embeddings) for _ in range(world_size)]
    all_labels = [torch.empty_like(padded_labels) for _ in range(world_size)]
    dist.all_gather(all_embeddings, padded_embeddings)
    dist.all_gather(all_labels, padded_labels)
    all_embeddings = [e[: int(n.item())] for e, n in zip(all_embeddings, sizes, strict=True)]
    all_labels = [lab[: int(n.item())] for lab, n in zip(all_labels, sizes, strict=True)]
    all_embeddings[rank] = embeddings
    return torch.cat(all_embeddings), torch.cat(all_labels)
