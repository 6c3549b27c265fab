"""Embedding head: linear projection to the embedding size, optional BatchNorm, L2 normalization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# default: PyTorch's Linear initialisation. kaiming_fan_out: kaiming-normal weights (mode fan_out, gain for ReLU)
# and zero bias, Proxy-Anchor's embedding layer. orthogonal: orthogonal weights and zero bias, hyp_metric's head.
HEAD_INITS = ("default", "kaiming_fan_out", "orthogonal")


class EmbeddingHead(nn.Module):
    """Projects pooled backbone features to ``embedding_dim`` and L2-normalises them.

    Args:
        in_features: size of the backbone's pooled features (filled in at assembly time).
        embedding_dim: output size, 128 or 512 in most papers.
        batch_norm: a BatchNorm1d after the projection (helps proxy and classification losses).
        normalize: L2-normalise the output so inner product equals cosine similarity.
        init: the projection's initialisation, ``default``, ``kaiming_fan_out`` or ``orthogonal`` (see ``HEAD_INITS``).
    """

    def __init__(
        self,
        in_features: int,
        embedding_dim: int = 128,
        batch_norm: bool = False,
        normalize: bool = True,
        init: str = "default",
    ):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"head.init={init!r} is not one of {', '.join(HEAD_INITS)}")
        self.in_features = in_features
        self.embedding_dim = embedding_dim
        self.projection = nn.Linear(in_features, embedding_dim)
        if init == "kaiming_fan_out":
            # std = sqrt(2 / fan_out), fan_out being embedding_dim for a Linear weight (out x in).
            nn.init.kaiming_normal_(self.projection.weight, mode="fan_out")
            nn.init.zeros_(self.projection.bias)
        elif init == "orthogonal":
            nn.init.orthogonal_(self.projection.weight)
            nn.init.zeros_(self.projection.bias)
        self.batch_norm = nn.BatchNorm1d(embedding_dim) if batch_norm else nn.Identity()
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embeddings = self.batch_norm(self.projection(features))
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings
