"""Weakly supervised training: a pair or triplet loss on exactly the given tuples, no class label read.

The tuples of a batch (:class:`~metricsearch.data.tuples.TupleDataset`) go to the pytorch-metric-learning loss as
its ``indices_tuple``: pairs as ``(anchors of similar pairs, their partners, anchors of dissimilar pairs, their
partners)``, triplets as ``(anchors, positives, negatives)``. No miner chooses among them and no label forms others.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, TripletMarginLoss
from pytorch_metric_learning.losses.generic_pair_loss import GenericPairLoss

from metricsearch.data.dataset import IMAGE
from metricsearch.data.tuples import PAIRS, SAME, TRIPLETS, TUPLES
from metricsearch.models.gather import gather_in_rank_order, rank_offset
from metricsearch.models.module import MetricLearningModule
from metricsearch.utils.config import ConfigError


def check_tuple_loss(loss: object, supervision: str) -> None:
    """Refuses a loss that cannot train on given tuples: pairs need a pair loss, triplets a triplet loss.

    Raises:
        ConfigError: naming the loss and what to choose instead.
    """
    name = type(loss).__name__
    if not isinstance(loss, BaseMetricLossFunction) or any(True for _ in loss.parameters()):
        raise ConfigError(
            f"supervision={supervision} trains on given tuples, which loss {name} (a proxy or classification loss "
            "that needs class labels) cannot use; choose loss=contrastive for pairs or loss=triplet for triplets"
        )
    if supervision == PAIRS and not isinstance(loss, GenericPairLoss):
        raise ConfigError(
            f"supervision=pairs needs a pair loss and loss {name} is not one; choose e.g. loss=contrastive "
            "(or multi_similarity, circle, ntxent)"
        )
    if supervision == TRIPLETS and not isinstance(loss, TripletMarginLoss):
        raise ConfigError(f"supervision=triplets needs loss=triplet (TripletMarginLoss), not {name}")


def tuple_loss(
    loss: BaseMetricLossFunction, embeddings: torch.Tensor, tuples: torch.Tensor, same: torch.Tensor | None
) -> torch.Tensor:
    """The loss of exactly the given tuples: ``tuples`` (T, 2) with ``same`` (T,) for pairs, or (T, 3) triplets,
    as rows of ``embeddings``."""
    if tuples.shape[1] == 2:
        if same is None:
            raise ValueError("pairs need their same / different flags")
        same = same.bool()
        indices_tuple = (tuples[same, 0], tuples[same, 1], tuples[~same, 0], tuples[~same, 1])
    else:
        indices_tuple = (tuples[:, 0], tuples[:, 1], tuples[:, 2])
    return loss(embeddings, None, indices_tuple)


class TupleModule(MetricLearningModule):
    """:class:`MetricLearningModule` trained on given pairs or triplets (``supervision=pairs | triplets``).

    Under DDP the loss sees every process's tuples: the images are gathered in rank order, each rank's tuples
    shifted to its rows, and the loss of the global batch is scaled by the world size for DDP's averaging (as the
    supervised losses are), so training equals one process on the global batch.

    Args:
        supervision: ``pairs`` or ``triplets``.
        kwargs: as :class:`MetricLearningModule`; the miner must be None and the cross-batch memory off.
    """

    def __init__(self, supervision: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if supervision not in (PAIRS, TRIPLETS):
            raise ConfigError(f"TupleModule trains pairs or triplets, not supervision={supervision}")
        check_tuple_loss(self.loss, supervision)
        if self.miner is not None:
            raise ConfigError(f"supervision={supervision} trains on exactly the given tuples: set miner=none")
        if "xbm" in self._train_parts:
            raise ConfigError(
                f"supervision={supervision} has no labels for a cross-batch memory: set module.xbm_memory_size=0"
            )
        self.supervision = supervision

    def _wrap_for_ranks(self, world_size: int) -> None:
        # The tuples are gathered in training_loss; pytorch-metric-learning's wrapper would not shift their indices.
        self._ranks_checked = True

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int, int | None]:
        embeddings = self.model(self._inputs(batch[IMAGE]))
        tuples, same = batch[TUPLES], batch.get(SAME)
        scale = 1
        if self._world_size > 1 and self.hparams.gather_across_ranks:
            (embeddings,), sizes = gather_in_rank_order(embeddings)
            shifted = [tuples + rank_offset(sizes)] + ([same.to(torch.uint8)] if same is not None else [])
            gathered, _ = gather_in_rank_order(*shifted)
            tuples, same = gathered[0], (gathered[1].bool() if same is not None else None)
            scale = self._world_size
        return tuple_loss(self.loss, embeddings, tuples, same) * scale, scale, len(batch[TUPLES]), None
