"""Embedding head: linear projection to the embedding size, optional BatchNorm, L2 normalization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Projects pooled backbone features to ``embedding_dim`` and L2-normalises them.

    Args:
        in_features: size of the backbone's pooled features (filled in at assembly time).
        embedding_dim: output size, 128 or 512 in most papers.
        batch_norm: a BatchNorm1d after the projection (helps proxy and classification losses).
        normalize: L2-normalise the output so inner product equals cosine similarity.
    """

    def __init__(self, in_features: int, embedding_dim: int = 128, batch_norm: bool = False, normalize: bool = True):
        super().__init__()
        self.in_features = in_features
        self.embedding_dim = embedding_dim
        self.projection = nn.Linear(in_features, embedding_dim)
        self.batch_norm = nn.BatchNorm1d(embedding_dim) if batch_norm else nn.Identity()
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embeddings = self.batch_norm(self.projection(features))
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings
