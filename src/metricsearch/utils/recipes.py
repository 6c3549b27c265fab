"""The recipe cards of ``conf/experiment/``: which paper recipe trains which dataset, and what the paper reports.

A recipe is an experiment config whose YAML opens with a ``recipe:`` card (e.g. cub_proxy_anchor_r50.yaml): the
paper, the official code, the official value of every setting (checked by tests/test_recipes.py), the differences
and the published numbers. ``make reproduce`` runs the recipes of each real dataset and prints the published numbers
beside its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from metricsearch.utils.config import CONFIG_DIR


@dataclass(frozen=True)
class RecipeCard:
    """What the tables need from a recipe's card."""

    name: str
    title: str
    dataset: str | None
    loss: str | None
    selection: str
    published_protocol: str
    published: dict[str, float] = field(default_factory=dict)
    # Where the published numbers come from (model, embedding size, dataset, source), or why there are none.
    published_row: str = ""
    # The gap to the published number we expect from reading the official code (not a measurement).
    expected_gap: str = ""
    # The conf/backbone option the recipe trains (its pretrained weights: BACKBONE_WEIGHTS).
    backbone: str | None = None


# The pretrained weights each recipe backbone loads; offline, give the file as that recipe's backbone.weights_file
# (`make reproduce WEIGHTS=bn_inception=PATH,...` passes each file to the recipes of its backbone only).
BACKBONE_WEIGHTS = {
    "bn_inception": "bn_inception-52deb4733.pth (Cadene's BN-Inception release, which the official code loads)",
    "resnet50_tv": "timm's resnet50.tv_in1k weights (torchvision's ImageNet ResNet-50, V1)",
    "vit_small_dino": "timm's vit_small_patch16_224.dino weights (DINO's self-supervised ViT-S/16)",
}


def _override(defaults: list, group: str) -> str | None:
    """The option a defaults list picks for ``group`` (``- override /data: cub`` gives ``cub``)."""
    for entry in defaults or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.split()[-1].lstrip("/") == group:
                    return str(value)
    return None


def read_card(path: Path) -> RecipeCard | None:
    """The card of one experiment YAML, or None when it has none (a plain experiment)."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    card = raw.get("recipe") if isinstance(raw, dict) else None
    if not isinstance(card, dict):
        return None
    published = card.get("published") or {}
    return RecipeCard(
        name=path.stem,
        title=str(card.get("title", path.stem)),
        dataset=_override(raw.get("defaults"), "data"),
        loss=_override(raw.get("defaults"), "loss"),
        selection=str(raw.get("selection") or "val"),
        published_protocol=str(card.get("published_protocol", "")),
        published={str(k): float(v) for k, v in published.items()},
        published_row=_spelled_out(str(card.get("published_row") or ""), card.get("sources") or {}),
        expected_gap=str(card.get("expected_gap") or ""),
        backbone=_override(raw.get("defaults"), "backbone"),
    )


@functools.cache
def recipe_cards(config_dir: Path = CONFIG_DIR) -> dict[str, RecipeCard]:
    """Every recipe of ``conf/experiment/`` by name."""
    cards = (read_card(path) for path in sorted((config_dir / "experiment").glob("*.yaml")))
    return {card.name: card for card in cards if card is not None}


def _spelled_out(row: str, sources: dict) -> str:
    """A row opening with a source alias (``PA:README.md:80 ...``), the alias spelled out as owner/repo@commit."""
    alias, sep, rest = row.partition(":")
    return f"{sources[alias]}:{rest}" if sep and alias in sources else row


def recipes_for(dataset: str, losses: list[str] | None = None) -> list[RecipeCard]:
    """The recipes that train ``dataset`` (a conf/data name), optionally only those of the given losses (a recipe
    whose loss is an official-formula variant, e.g. ``multi_similarity_official``, counts as its loss's)."""
    return [
        card
        for card in recipe_cards().values()
        if card.dataset == dataset and (not losses or any(_same_loss(card.loss, loss) for loss in losses))
    ]


def _same_loss(recipe_loss: str | None, loss: str) -> bool:
    return recipe_loss is not None and (recipe_loss == loss or recipe_loss.startswith(f"{loss}_"))


def published_recall_at_1(card: RecipeCard) -> str:
    """The published Recall@1 as the tables print it: the number, or why there is none (never another model's)."""
    value = card.published.get("recall@1")
    if value is not None:
        return f"{value:.1f}"
    return "not verified" if card.published_row.startswith("not verified") else "none"
