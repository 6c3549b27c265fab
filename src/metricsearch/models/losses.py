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
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory


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


class OfficialMultiSimilarityLoss(BaseMetricLossFunction):
    """Multi-Similarity loss exactly as its official code computes it (Wang et al. 2019, CVPR).

    pytorch-metric-learning's ``MultiSimilarityLoss`` with its ``MultiSimilarityMiner`` differs in two places: it keeps
    an anchor whose mined positives or mined negatives are empty (a one-sided term), and it compares positives of
    similarity 1 (the anchor itself, exact duplicates) with the negatives. The official loss (research-ms-loss,
    ``ret_benchmark/losses/multi_similarity_loss.py``) does, for each anchor ``i`` of the batch, on the cosine
    similarities ``s`` of L2-normalised embeddings:

    - positives: the same label, ``s < 1 - 1e-5``; negatives: another label;
    - mined negatives: ``s + margin > min(positives)``; mined positives: ``s - margin < max(negatives)``;
    - the anchor is skipped unless both mined sets are non-empty; otherwise its loss is
      ``log(1 + sum exp(-alpha (s_p - base))) / alpha + log(1 + sum exp(beta (s_n - base))) / beta``;

    and the batch loss is the sum over the kept anchors divided by the batch size (skipped anchors count as 0).

    Args:
        alpha: the positives' scale (``SCALE_POS``, 2).
        beta: the negatives' scale (``SCALE_NEG``, 40 in the official config).
        base: the similarity threshold lambda (0.5).
        margin: the mining margin epsilon (0.1).
        kwargs: pytorch-metric-learning's ``reducer`` / ``embedding_regularizer`` (the distance is fixed: the dot
            product of the embeddings, which the head normalises).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5, margin: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if not (alpha > 0 and beta > 0):
            raise ValueError(f"loss.alpha={alpha} and loss.beta={beta} must be positive")
        self.alpha, self.beta, self.base, self.margin = float(alpha), float(beta), float(base), float(margin)
        self.add_to_recordable_attributes(list_of_names=["alpha", "beta", "base", "margin"], is_stat=False)

    def get_default_distance(self) -> DotProductSimilarity:
        return DotProductSimilarity(normalize_embeddings=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        if indices_tuple is not None:
            raise ValueError(
                "loss=multi_similarity_official mines its own pairs (the official rule) and takes no miner: set "
                "miner=none"
            )
        similarities = embeddings @ ref_emb.T
        same = labels[:, None] == ref_labels[None, :]
        positive = same & (similarities < 1 - 1e-5)
        negative = ~same
        inf = torch.tensor(float("inf"), device=embeddings.device, dtype=similarities.dtype)
        hardest_positive = torch.where(positive, similarities, inf).min(dim=1, keepdim=True).values
        hardest_negative = torch.where(negative, similarities, -inf).max(dim=1, keepdim=True).values
        mined_negative = negative & (similarities + self.margin > hardest_positive)
        mined_positive = positive & (similarities - self.margin < hardest_negative)
        kept = mined_positive.any(dim=1) & mined_negative.any(dim=1)
        positive_loss = _log_one_plus_sum_exp(-self.alpha * (similarities - self.base), mined_positive) / self.alpha
        negative_loss = _log_one_plus_sum_exp(self.beta * (similarities - self.base), mined_negative) / self.beta
        per_anchor = torch.where(kept, positive_loss + negative_loss, torch.zeros_like(positive_loss))
        loss = per_anchor.sum() / len(embeddings)
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}


class OfficialXBMContrastiveLoss(BaseMetricLossFunction):
    """The contrastive loss of the official cross-batch memory code (Wang et al. 2020, CVPR; research-xbm,
    ``ret_benchmark/losses/contrastive_loss.py``), on cosine similarities ``s`` of L2-normalised embeddings.

    For each anchor of the batch against the reference set (the batch itself, or the memory): the sum over its
    positives (same label, ``s < 1 - 1e-5``, so not itself) of ``1 - s``, plus the sum over its negatives with
    ``s > margin`` of ``s``; the loss is the sum over anchors divided by the number of anchors. Unlike
    pytorch-metric-learning's ``ContrastiveLoss`` (whose default reducer averages over the non-zero pair losses,
    positives and negatives separately), every pair weighs the same and the scale grows with the number of pairs.

    Given an ``indices_tuple`` of pairs (as ``CrossBatchMemory`` passes, without the self-comparisons), only those
    pairs count; the ``s < 1 - 1e-5`` rule still drops positives that are copies of the anchor.

    Args:
        margin: negatives with a similarity above it contribute (0.5).
    """

    def __init__(self, margin: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.margin = float(margin)
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)

    def get_default_distance(self) -> DotProductSimilarity:
        return DotProductSimilarity(normalize_embeddings=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        similarities = embeddings @ ref_emb.T
        same = labels[:, None] == ref_labels[None, :]
        if indices_tuple is None:
            positive, negative = same, ~same
        else:
            anchor_p, positive_index, anchor_n, negative_index = indices_tuple
            positive = torch.zeros_like(same)
            negative = torch.zeros_like(same)
            positive[anchor_p, positive_index] = True
            negative[anchor_n, negative_index] = True
        positive = positive & (similarities < 1 - 1e-5)
        negative = negative & (similarities > self.margin)
        zero = torch.zeros_like(similarities)
        total = torch.where(positive, 1 - similarities, zero).sum() + torch.where(negative, similarities, zero).sum()
        loss = total / len(embeddings)
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}


class ViewPairCrossEntropyLoss(BaseMetricLossFunction):
    """The pairwise cross-entropy of hyp_metric (Ermolov et al. 2022, CVPR; ``train.py`` ``contrastive_loss``), in its
    sphere mode (``--hyp_c 0``): each class of the batch appears ``m`` times; for every ordered pair of views
    ``(i, j)``, ``i != j``, view ``i`` of each class must pick view ``j`` of the same class among view ``j`` of every
    class and view ``i`` of the other classes (softmax cross-entropy over dot products / temperature, averaged over
    classes), and the loss is the sum over the ``m (m - 1)`` pairs of views.

    With ``m = 2`` this is pytorch-metric-learning's ``NTXentLoss`` times 2; with more views per class it differs:
    NT-Xent's denominator holds every view of every other class, this one only views ``i`` and ``j``.

    Args:
        temperature: divides the similarities (0.1 for the sphere version, 0.2 the code's default).
    """

    def __init__(self, temperature: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"loss.temperature={temperature} must be positive")
        self.temperature = float(temperature)
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def get_default_distance(self) -> DotProductSimilarity:
        return DotProductSimilarity(normalize_embeddings=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        if indices_tuple is not None or ref_emb is not embeddings:
            raise ValueError(
                "loss=view_pair_cross_entropy compares the views of one batch and takes no miner or memory: set "
                "miner=none and module.xbm_memory_size=0"
            )
        order = torch.sort(labels, stable=True).indices
        _, counts = torch.unique_consecutive(labels[order], return_counts=True)
        views = int(counts[0])
        if views < 2 or bool((counts != views).any()):
            raise ValueError(
                "loss=view_pair_cross_entropy needs every label of a batch the same number of times (at least 2): use "
                "the m-per-class sampler (sampler.m >= 2)"
            )
        grouped = embeddings[order].reshape(len(counts), views, -1)
        targets = torch.arange(len(counts), device=embeddings.device)
        self_mask = torch.eye(len(counts), device=embeddings.device, dtype=torch.bool)
        loss = embeddings.new_zeros(())
        for i in range(views):
            for j in range(views):
                if i == j:
                    continue
                across = grouped[:, i] @ grouped[:, j].T / self.temperature
                within = (grouped[:, i] @ grouped[:, i].T / self.temperature).masked_fill(self_mask, float("-inf"))
                loss = loss + F.cross_entropy(torch.cat([across, within], dim=1), targets)
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}


def _log_one_plus_sum_exp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise ``log(1 + sum of exp(values) over mask)``, computed stably (0 for an empty row)."""
    masked = torch.where(mask, values, torch.full_like(values, float("-inf")))
    with_one = torch.cat([torch.zeros_like(values[:, :1]), masked], dim=1)
    return torch.logsumexp(with_one, dim=1)


class ProjectCrossBatchMemory(CrossBatchMemory):
    """pytorch-metric-learning's ``CrossBatchMemory`` that also accepts the project's own pair losses, which take a
    reference set (``ref_emb``, ``ref_labels``) and an ``indices_tuple`` of pairs as the library's pair losses do."""

    @staticmethod
    def supported_losses() -> list[str]:
        return [*CrossBatchMemory.supported_losses(), "OfficialXBMContrastiveLoss"]
