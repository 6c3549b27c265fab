"""Self-supervised training: two views of each image are the positive pair; no label is read.

Three methods, each on a projection of the embedding (an MLP used only in training, as the papers do; the
embedding that is searched is the one before it):

- ``simclr``: NT-Xent over the 2N views of the batch (Chen et al. 2020, "A Simple Framework for Contrastive
  Learning of Visual Representations", ICML): each view's positive is the other view of its image, its negatives the
  2N - 2 other views. pytorch-metric-learning's ``NTXentLoss`` with each image's index as the label of both views.
- ``vicreg``: invariance, variance and covariance terms between the two views' projections (Bardes, Ponce & LeCun
  2022, ICLR), pytorch-metric-learning's ``VICRegLoss``.
- ``moco``: a momentum encoder (an exponential moving average of the model and projector) embeds the second view as
  the key; each query (first view) is contrasted with its key against a queue of earlier keys (He et al. 2020,
  CVPR; MoCo v2, Chen et al. 2020, arXiv:2003.04297: MLP projector, temperature 0.2, the augmentations of
  :mod:`metricsearch.data.views`). The queue is pytorch-metric-learning's ``CrossBatchMemory`` around
  ``NTXentLoss``: keys are enqueued, queries are not, and every key gets a label never used before, so a query's
  only positive is its own key and its negatives are the batch's other keys and the queue.

Under DDP the projections of every process are gathered in rank order before the loss (negatives, batch statistics
and the queue span the global batch, the same queue on every rank), and the loss is scaled by the world size, so
DDP's gradient averaging gives the gradient of the global-batch loss.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss, VICRegLoss
from torch import nn

from metricsearch.data.views import VIEWS
from metricsearch.models.gather import gather_in_rank_order
from metricsearch.models.module import MetricLearningModule
from metricsearch.utils.config import ConfigError

METHODS = ("simclr", "vicreg", "moco")
METHOD_LOSSES = {"simclr": NTXentLoss, "vicreg": VICRegLoss, "moco": NTXentLoss}


def build_projector(embedding_dim: int, dims: Sequence[int]) -> nn.Module:
    """The training-only projection MLP: Linear-BatchNorm-ReLU between layers, a plain Linear last (identity if
    ``dims`` is empty)."""
    layers: list[nn.Module] = []
    sizes = [embedding_dim, *[int(d) for d in dims]]
    for position, (inputs, outputs) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(inputs, outputs))
        if position < len(sizes) - 2:
            layers += [nn.BatchNorm1d(outputs), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers) if layers else nn.Identity()


def simclr_loss(loss: NTXentLoss, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """NT-Xent of two views: row i of ``first`` and of ``second`` are the positive pair, every other row a negative."""
    labels = torch.arange(len(first), device=first.device)
    return loss(torch.cat([first, second]), torch.cat([labels, labels]))


def vicreg_loss(loss: VICRegLoss, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """VICReg between the two views' projections (row i of each is the same image)."""
    return loss(first, ref_emb=second)


def moco_loss(queue: CrossBatchMemory, queries: torch.Tensor, keys: torch.Tensor, first_label: int) -> torch.Tensor:
    """InfoNCE of each query against its own key (positive), the other keys and the queue (negatives); the keys
    are then in the queue. ``first_label`` must exceed every label already queued."""
    labels = torch.arange(first_label, first_label + len(queries), device=queries.device)
    enqueue = torch.cat([torch.zeros(len(queries), dtype=torch.bool), torch.ones(len(keys), dtype=torch.bool)])
    return queue(
        torch.cat([queries, keys.detach()]), torch.cat([labels, labels]), enqueue_mask=enqueue.to(queries.device)
    )


class SelfSupervisedModule(MetricLearningModule):
    """:class:`MetricLearningModule` trained without labels on two views per image (``supervision=none``).

    Args:
        method: ``simclr``, ``vicreg`` or ``moco`` (see the module docstring).
        projector_dims: the projection MLP's layer sizes after the embedding (empty: the loss sees the embedding).
        momentum: the momentum encoder's EMA coefficient (``moco``).
        queue_size: keys kept in the queue (``moco``); at least the global batch.
        kwargs: as :class:`MetricLearningModule`; ``loss`` is the method's (``NTXentLoss`` or ``VICRegLoss``), the
            miner None and the cross-batch memory off.
    """

    def __init__(
        self,
        method: str = "simclr",
        projector_dims: Sequence[int] = (512, 128),
        momentum: float = 0.99,
        queue_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ConfigError(f"supervision.method={method} is not one of {', '.join(METHODS)}")
        if not isinstance(self.loss, METHOD_LOSSES[method]):
            raise ConfigError(
                f"supervision.method={method} trains with {METHOD_LOSSES[method].__name__}, "
                f"not {type(self.loss).__name__}"
            )
        if self.miner is not None or "xbm" in self._train_parts:
            raise ConfigError("supervision=none forms its own pairs: set miner=none and module.xbm_memory_size=0")
        if not 0 <= momentum < 1:
            raise ConfigError(f"supervision.momentum={momentum} must be in [0, 1), e.g. 0.99")
        self.method = method
        self.momentum = float(momentum)
        self.projector = build_projector(self.model.embedding_dim, projector_dims)
        output_dim = int(projector_dims[-1]) if len(projector_dims) else self.model.embedding_dim
        if method == "moco":
            self.key_model = copy.deepcopy(self.model)
            self.key_projector = copy.deepcopy(self.projector)
            for parameter in [*self.key_model.parameters(), *self.key_projector.parameters()]:
                parameter.requires_grad_(False)
            self._train_parts["queue"] = CrossBatchMemory(self.loss, embedding_size=output_dim, memory_size=queue_size)
            # The label of the next key: every key ever queued has its own.
            self.register_buffer("keys_seen", torch.zeros((), dtype=torch.long))

    def _wrap_for_ranks(self, world_size: int) -> None:
        # The projections are gathered in training_loss (pytorch-metric-learning's wrapper takes no second view).
        self._ranks_checked = True

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().parameter_groups()
        trainable = [p for p in self.projector.parameters() if p.requires_grad]
        if trainable:
            multiplier = float(self.hparams.lr_multipliers["head"])
            groups.append({"params": trainable, "name": "projector", "lr_multiplier": multiplier})
        return groups

    @torch.no_grad()
    def _update_momentum_encoder(self) -> None:
        pairs = [(self.key_model, self.model), (self.key_projector, self.projector)]
        for key_part, part in pairs:
            for key_parameter, parameter in zip(key_part.parameters(), part.parameters(), strict=True):
                key_parameter.mul_(self.momentum).add_(parameter.detach(), alpha=1 - self.momentum)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int, int | None]:
        views = batch[VIEWS]
        size = views.shape[1]
        if self.method == "moco":
            self._update_momentum_encoder()
            first = self.projector(self.model(self._inputs(views[0])))
            with torch.no_grad():
                second = self.key_projector(self.key_model(self._inputs(views[1])))
        else:
            # Both views in one forward pass: BatchNorm normalises them together, as SimCLR does.
            projected = self.projector(self.model(self._inputs(views.flatten(0, 1))))
            first, second = projected[:size], projected[size:]
        scale = 1
        if self._world_size > 1 and self.hparams.gather_across_ranks:
            (first, second), _ = gather_in_rank_order(first, second)
            scale = self._world_size
        if self.method == "simclr":
            loss = simclr_loss(self.loss, first, second)
        elif self.method == "vicreg":
            loss = vicreg_loss(self.loss, first, second)
        else:
            queue = self._train_parts["queue"]
            if len(second) > queue.memory_size:
                raise ConfigError(
                    f"supervision.queue_size={queue.memory_size} is smaller than the global batch ({len(second)}); "
                    "raise supervision.queue_size"
                )
            loss = moco_loss(queue, first, second, int(self.keys_seen))
            self.keys_seen += len(second)
        return loss * scale, scale, size, None
