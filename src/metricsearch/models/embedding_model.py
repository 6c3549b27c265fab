"""The embedding network: a backbone followed by a head, built from their configs in one place."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn


class EmbeddingModel(nn.Module):
    """Backbone followed by head: images in, L2-normalised embeddings out. What training, search and export use."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def embedding_dim(self) -> int:
        return self.head.embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_embedding_model(backbone_cfg: Mapping[str, Any], head_cfg: Mapping[str, Any]) -> EmbeddingModel:
    """Backbone and head from their ``_target_`` configs (Hydra nodes or plain dicts), with the weights they load.

    A partial head (``_partial_: true``) gets the backbone's feature size, unless its config records one (as
    the head of a :class:`~metricsearch.models.model_config.ModelConfig` does).

    NOTE: this instantiates whatever the configs name. A config read from a file someone handed over goes through
    :meth:`~metricsearch.models.model_config.ModelConfig.from_dict` first, which admits only the project's parts.
    """
    backbone = instantiate(backbone_cfg)
    head = instantiate(head_cfg)
    if isinstance(head, functools.partial):
        head = head() if "in_features" in head.keywords else head(in_features=backbone.num_features)
    return EmbeddingModel(backbone, head)
