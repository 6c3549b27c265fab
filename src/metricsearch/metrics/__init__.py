"""Retrieval evaluation: Recall@K, R-Precision, MAP@R and NMI computed exactly, and a torchmetrics holder."""

from metricsearch.metrics.metric import CollectedEmbeddings, RetrievalMetric
from metricsearch.metrics.retrieval import (
    calc_nmi,
    calc_retrieval_metrics,
    count_relevant,
)

__all__ = [
    "CollectedEmbeddings",
    "RetrievalMetric",
    "calc_nmi",
    "calc_retrieval_metrics",
    "count_relevant",
]
