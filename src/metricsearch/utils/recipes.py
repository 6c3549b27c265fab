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
    )


@functools.cache
def recipe_cards(config_dir: Path = CONFIG_DIR) -> dict[str, RecipeCard]:
    """Every recipe of ``conf/experiment/`` by name."""
    cards = (read_card(path) for path in sorted((config_dir / "experiment").glob("*.yaml")))
    return {card.name: card for card in cards if card is not None}


def recipes_for(dataset: str, losses: list[str] | None = None) -> list[RecipeCard]:
    """The recipes that train ``dataset`` (a conf/data name), optionally only those of the given losses."""
    return [card for card in recipe_cards().values() if card.dataset == dataset and (not losses or card.loss in losses)]
