"""Retrieval evaluation: exact k-NN with faiss, Recall@K, R-Precision, MAP@R, NMI, and a torchmetrics holder."""

from metricsearch.metrics.metric import CollectedEmbeddings, RetrievalMetric
from metricsearch.metrics.retrieval import (
    calc_map_at_r,
    calc_nmi,
    calc_r_precision,
    calc_recall_at_k,
    calc_retrieval_metrics,
    count_relevant,
    find_neighbors,
)

__all__ = [
    "CollectedEmbeddings",
    "RetrievalMetric",
    "calc_map_at_r",
    "calc_nmi",
    "calc_r_precision",
    "calc_recall_at_k",
    "calc_retrieval_metrics",
    "count_relevant",
    "find_neighbors",
]
