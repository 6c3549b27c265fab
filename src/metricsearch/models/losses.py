"""Losses of the project's own, as pytorch-metric-learning losses (so the DDP gather wrapper and the module's
``loss(embeddings, labels, indices_tuple)`` call work unchanged).

:class:`AnchorPositiveSoftmaxLoss` is the loss of the Keras example "Metric learning for image similarity search"
(Kelcey 2020, keras.io), a supervised form of the N-pair loss (Sohn 2016, NeurIPS): each batch holds one anchor
and one positive per class; the anchor x positive similarity matrix divided by a temperature is read as logits,
and softmax cross-entropy asks each anchor to pick its own positive (the diagonal) among the other classes'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction


class AnchorPositiveSoftmaxLoss(BaseMetricLossFunction):
    """Softmax cross-entropy over anchor x positive similarities, the diagonal as targets.

    Every label of a batch must appear exactly twice (the m-per-class sampler with ``sampler.m=2``): its first
    occurrence is the anchor, its second the positive. With anchors ``A`` and positives ``P`` (one row per label)
    the loss is the mean over anchors ``i`` of ``-log softmax(A P^T / temperature)[i, i]``.

    Args:
        temperature: divides the similarities before the softmax (0.2 in the example).
        kwargs: pytorch-metric-learning's ``distance`` (default: dot product, which on the L2-normalised
            embeddings of ``head=linear`` is the example's), ``reducer`` and ``embedding_regularizer``.
    """

    def __init__(self, temperature: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"loss.temperature={temperature} must be positive (the example uses 0.2)")
        self.temperature = float(temperature)
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def get_default_distance(self) -> DotProductSimilarity:
        return DotProductSimilarity(normalize_embeddings=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        if indices_tuple is not None:
            raise ValueError(
                "loss=anchor_positive_softmax uses every anchor/positive pair of the batch and takes no miner: "
                "set miner=none"
            )
        if ref_emb is not embeddings:
            raise ValueError(
                "loss=anchor_positive_softmax compares a batch's anchors with its own positives only; it cannot take "
                "reference embeddings (cross-batch memory): set module.xbm_memory_size=0"
            )
        anchors, positives = pair_anchors_with_positives(labels)
        similarities = self.distance(embeddings[anchors], embeddings[positives])
        if not self.distance.is_inverted:
            similarities = -similarities
        targets = torch.arange(len(anchors), device=embeddings.device)
        losses = F.cross_entropy(similarities / self.temperature, targets, reduction="none")
        return {"loss": {"losses": losses, "indices": anchors, "reduction_type": "element"}}


def pair_anchors_with_positives(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch positions of each label's anchor (its first image) and positive (its second), in label order.

    Raises:
        ValueError: a label that does not appear exactly twice, naming the sampler setting that fixes it.
    """
    if labels is None:
        raise ValueError("loss=anchor_positive_softmax needs the labels of the batch to pair anchors with positives")
    # A stable sort keeps each label's images in batch order: the first of each pair is the anchor.
    order = torch.sort(labels, stable=True).indices
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    wrong = counts != 2
    if wrong.any():
        label, count = classes[wrong][0].item(), counts[wrong][0].item()
        raise ValueError(
            f"loss=anchor_positive_softmax needs every label of a batch exactly twice (one anchor, one positive), "
            f"but label {label} appears {count} time(s): use the m-per-class sampler with sampler.m=2 (and under DDP "
            "module.gather_across_ranks=false, since two processes may draw the same class)"
        )
    return order[0::2], order[1::2]
