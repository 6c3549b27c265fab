"""Which model embeds the images: the one definition of the ``ckpt=`` / ``model=`` / ``backbone=`` choice.

Every function and command that takes a model takes these keywords (``load_embedder(**choice)``,
``open_index(folder, **choice)``, ``create_app(folder, **choice)``, ``scripts/search.py ckpt=PATH``); none given
means the model an index records. Light on purpose (no torch), so the command lines can list the options.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict


class ModelChoice(TypedDict, total=False):
    """At most one of: a training checkpoint, an ONNX export, or a pretrained backbone's name."""

    ckpt: str | Path | None
    model: str | Path | None
    backbone: str | None


# What each choice is, as the command lines' --help says it.
MODEL_CHOICE_HELP = {
    "ckpt": "a training checkpoint (.ckpt; an .onnx file works too)",
    "model": "an ONNX export (scripts/export.py)",
    "backbone": "a pretrained backbone used without training, e.g. efficientnet_lite0_imagenet",
}

# The choice that names each kind of model source an index records (``Embedder.source["kind"]``).
CHOICE_OF_SOURCE = {"checkpoint": "ckpt", "onnx": "model", "backbone": "backbone"}


def given_choice(choice: ModelChoice) -> ModelChoice:
    """The choices ``choice`` actually makes (those set to a value).

    Raises:
        TypeError: a keyword that is not a model choice.
    """
    unknown = set(choice) - set(MODEL_CHOICE_HELP)
    if unknown:
        raise TypeError(f"unknown model choice {sorted(unknown)}; the choices are {', '.join(MODEL_CHOICE_HELP)}")
    return {key: value for key, value in choice.items() if value}  # type: ignore[return-value]
