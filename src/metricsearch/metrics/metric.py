"""A torchmetrics holder that gathers embeddings across steps and DDP ranks and computes retrieval metrics."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from metricsearch.metrics.postprocess import PostprocessSettings
from metricsearch.metrics.retrieval import calc_retrieval_metrics
from metricsearch.metrics.verification import VerificationCurve, calc_verification

__all__ = ["CollectedEmbeddings", "RetrievalMetric"]


class CollectedEmbeddings(NamedTuple):
    """The evaluation set as gathered by ``RetrievalMetric``: one row per dataset sample, sorted by index."""

    embeddings: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


class RetrievalMetric(Metric):
    """Collects embeddings, labels and dataset indices, then computes the retrieval metrics over the whole set.

    Retrieval metrics are not averages over batches: every query searches the whole evaluation set, so the
    embeddings are kept until ``compute``. The states are concatenated across DDP ranks. A
    ``DistributedSampler`` pads the last batches by repeating samples, which would add spurious exact
    duplicates to the gallery; the dataset index of each sample identifies them, and only its first occurrence
    is kept.

    By default the collected set is a query = gallery set (each item searched among all the others). With
    ``num_queries`` set (an attribute the module may also set after construction), the items whose *dataset index*
    is below it are the queries and the others the gallery, each query searched in the gallery only: the evaluation
    dataset lists the queries first, then the gallery, and one DataLoader embeds both.

    Args:
        recall_at_k: The values of K for Recall@K.
        compute_nmi: Whether to also cluster the embeddings for NMI (the queries only, with a gallery).
        nmi_max_macs: NMI's k-means budget on the CPU in multiply-adds (see ``calc_retrieval_metrics``).
        seed: Seed of the k-means clustering for NMI.
        num_queries: None for a query = gallery set; else the number of queries, which hold dataset indices
            ``0 .. num_queries - 1`` (the gallery the indices from ``num_queries`` on).
        postprocess: Re-ranking or query expansion applied before the neighbour-based metrics (see
            :mod:`metricsearch.metrics.postprocess`); NMI is computed on the embeddings as they are.
        verification_fmrs: False match rates at which to also report the FNMR over every pair of the set
            (``fnmr@fmr=0.001``); the full curve is kept in ``last_verification``. Empty: none.
        **kwargs: Passed on to ``torchmetrics.Metric`` (e.g. ``compute_on_cpu``).

    Example:
        >>> metric = RetrievalMetric(recall_at_k=[1], compute_nmi=False)
        >>> metric.update(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), torch.tensor([0, 0]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0]), torch.tensor([2, 0]))
        >>> metric.compute()["num_queries"]
        2.0
        >>> metric.num_queries = 1  # item 0 is the query, items 1 and 2 the gallery
        >>> metric.compute()["num_queries"], metric.compute()["recall@1"]
        (1.0, 1.0)
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    embeddings: list[torch.Tensor] | torch.Tensor
    labels: list[torch.Tensor] | torch.Tensor
    indices: list[torch.Tensor] | torch.Tensor

    def __init__(
        self,
        recall_at_k: Sequence[int] = (1, 2, 4, 8),
        compute_nmi: bool = True,
        seed: int = 0,
        nmi_max_macs: float | None = None,
        num_queries: int | None = None,
        postprocess: PostprocessSettings | None = None,
        verification_fmrs: Sequence[float] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.postprocess = postprocess or PostprocessSettings()
        self.verification_fmrs = tuple(float(f) for f in verification_fmrs)
        # The ROC / DET curve of the latest compute() with verification_fmrs (None before, or when the set has no
        # genuine or no impostor pair).
        self.last_verification: VerificationCurve | None = None
        self.recall_at_k = [int(k) for k in recall_at_k]
        self.compute_nmi = compute_nmi
        self.nmi_max_macs = nmi_max_macs
        self.seed = seed
        self.num_queries = num_queries
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    @property
    def num_queries(self) -> int | None:
        """None for a query = gallery set; else the dataset indices below it are the queries, the rest the gallery."""
        return self._num_queries

    @num_queries.setter
    def num_queries(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"num_queries must be None or a positive integer, got {value!r}")
        self._num_queries = None if value is None else int(value)
        # torchmetrics caches the result of compute() until the next update: it was computed for the old split.
        self._computed = None

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Stores one batch.

        Args:
            embeddings: Tensor of shape (B, D); need not be normalised.
            labels: Tensor of shape (B,), the class of each sample.
            indices: Tensor of shape (B,), each sample's index in the dataset.
        """
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must have shape (B, D), got {tuple(embeddings.shape)}")
        if labels.shape != (len(embeddings),) or indices.shape != (len(embeddings),):
            raise ValueError(
                f"labels and indices must have shape ({len(embeddings)},), "
                f"got {tuple(labels.shape)} and {tuple(indices.shape)}"
            )
        self.embeddings.append(embeddings.detach().to(torch.float32))
        self.labels.append(labels.detach().to(torch.int64))
        self.indices.append(indices.detach().to(torch.int64))

    def compute(self) -> dict[str, float]:
        """Computes the metrics of ``calc_retrieval_metrics`` on the deduplicated, L2-normalised embeddings.

        When the embeddings were collected on a GPU, the similarity blocks are computed there too: at SOP size
        that takes a fraction of a second instead of tens of seconds on the CPU.
        """
        gallery: dict[str, np.ndarray] = {}
        if self.num_queries is None:
            queries = self.collected()
        else:
            queries, gallery_part = self.split_queries()
            gallery = {"gallery_embeddings": gallery_part.embeddings, "gallery_labels": gallery_part.labels}
        metrics = calc_retrieval_metrics(
            queries.embeddings,
            queries.labels,
            self.recall_at_k,
            compute_nmi=self.compute_nmi,
            nmi_max_macs=self.nmi_max_macs,
            seed=self.seed,
            device=self.device if self.device.type == "cuda" else None,
            **gallery,
        )
        if self.postprocess.method != "none" and metrics["num_queries"] > 0:
            metrics.update(self.postprocess.metrics(queries.embeddings, queries.labels, self.recall_at_k, **gallery))
        if self.verification_fmrs:
            metrics.update(self._verification(queries, gallery))
        return metrics

    def _verification(self, queries: CollectedEmbeddings, gallery: dict[str, np.ndarray]) -> dict[str, float]:
        try:
            curve = calc_verification(queries.embeddings, queries.labels, self.verification_fmrs, **gallery)
        except ValueError as err:  # no genuine or no impostor pair: verification is undefined, retrieval is not
            warnings.warn(f"verification metrics left out: {err}", RuntimeWarning, stacklevel=3)
            self.last_verification = None
            return {}
        self.last_verification = curve
        return {f"fnmr@fmr={point['fmr_target']:g}": point["fnmr"] for point in curve.operating_points}

    def split_queries(self, normalize: bool = True) -> tuple[CollectedEmbeddings, CollectedEmbeddings]:
        """Returns :meth:`collected` split into (queries, gallery) by ``num_queries``.

        Each part keeps its dataset indices: the gallery's start at ``num_queries`` (its item ``i`` in the gallery's
        own order has index ``num_queries + i`` when the whole dataset was collected).

        Raises:
            ValueError: If ``num_queries`` is not set, or either part is empty.
        """
        if self.num_queries is None:
            raise ValueError("num_queries is None: set it to the number of queries to split the collected set")
        collected = self.collected(normalize=normalize)
        is_query = collected.indices < self.num_queries
        queries = CollectedEmbeddings(*(array[is_query] for array in collected))
        gallery = CollectedEmbeddings(*(array[~is_query] for array in collected))
        if len(queries.indices) == 0 or len(gallery.indices) == 0:
            empty = "queries" if len(queries.indices) == 0 else "gallery"
            raise ValueError(
                f"no {empty} collected with num_queries={self.num_queries} ({len(collected.indices)} items, dataset "
                f"indices {collected.indices.min()}..{collected.indices.max()}): the queries must have dataset "
                "indices below num_queries and the gallery the indices from it on"
            )
        return queries, gallery

    def collected(self, normalize: bool = True) -> CollectedEmbeddings:
        """Returns the gathered set with one row per dataset index (the first occurrence), sorted by index.

        These are the arrays the metrics are computed on, e.g. for drawing retrieval grids. Within ``compute``
        the states hold every rank's samples; elsewhere under DDP they hold this rank's only, unless called inside
        ``with metric.sync_context():``.

        Args:
            normalize: Whether to L2-normalise the embeddings (in float32), as the metrics do.

        Raises:
            ValueError: If nothing was collected, or one dataset index came with two different labels (a sign
                that batch positions were passed instead of dataset indices).
        """
        if _is_empty(self.embeddings):
            raise ValueError("RetrievalMetric has no samples: call update() before compute()")
        embeddings = dim_zero_cat(self.embeddings).cpu().numpy()
        # NOTE: a rank that received no data contributes an empty float tensor to the DDP gather, and the
        # concatenation then promotes the integer states to float: cast them back.
        labels = dim_zero_cat(self.labels).cpu().numpy().astype(np.int64)
        indices = dim_zero_cat(self.indices).cpu().numpy().astype(np.int64)

        # np.unique returns the position of each index's first occurrence, in increasing order of index.
        unique_indices, first, inverse = np.unique(indices, return_index=True, return_inverse=True)
        if not np.array_equal(labels[first][inverse.reshape(-1)], labels):
            raise ValueError("a dataset index was collected with two different labels; pass dataset indices")
        embeddings = embeddings[first]
        if normalize:
            norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
            embeddings = embeddings / np.maximum(norms, np.float32(1e-12))
        return CollectedEmbeddings(embeddings.astype(np.float32, copy=False), labels[first], unique_indices)


def _is_empty(state: list[torch.Tensor] | torch.Tensor) -> bool:
    return len(state) == 0 if isinstance(state, list) else state.numel() == 0
