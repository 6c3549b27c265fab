"""The model config: what rebuilds an embedding network and its preprocessing without the training config.

Training stores it in every checkpoint (``hyper_parameters.model_config``), an index records it in its
``metadata.json`` and an ONNX export in its metadata, always as the plain dict of :meth:`ModelConfig.to_dict`::

    {"backbone": {"_target_": ..., ...}, "head": {"_target_": ..., "_partial_": true, "in_features": ..., ...},
     "image_size": 224, "resize_size": 256, "mean": [...], "std": [...]}

plus ``"channel_order": "BGR"`` for a network that takes its channels reversed (BN-Inception's Caffe weights); the
key is written only then, so an RGB model's config, and the weight fingerprint computed over its preprocessing,
are the same as before the key existed, and a config without it means RGB.

A config read back from a file is data someone may have handed over: :meth:`ModelConfig.from_dict` admits only the
``_target_``\\ s of the project's own backbone and head options and no ``${...}`` interpolation (see
:func:`check_model_config`), because Hydra would instantiate or resolve anything else.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from metricsearch.data.transforms import CHANNEL_ORDERS
from metricsearch.models.embedding_model import EmbeddingModel
from metricsearch.utils.config import CONFIG_DIR
from metricsearch.utils.messages import shorten

PREPROCESSING_KEYS = ("image_size", "resize_size", "mean", "std")
# Optional preprocessing key, absent for the default (RGB).
CHANNEL_ORDER_KEY = "channel_order"
DEFAULT_CHANNEL_ORDER = "RGB"
# The head that turns a pretrained backbone's pooled features into embeddings without training.
NORMALIZE_HEAD_TARGET = "metricsearch.models.pretrained.NormalizeHead"
# The config groups whose options are the project's model parts: only their _target_s are ever instantiated from a
# checkpoint's or an index's model config.
MODEL_PART_GROUPS = ("backbone", "head")
# More nodes than any model config of the project has by orders of magnitude; a bigger one is not read through.
MAX_CONFIG_NODES = 100_000


class ModelConfigError(ValueError):
    """A model config that cannot be used: a section missing or malformed, or a part that is not the project's."""


def preprocessing_of(model_config: dict[str, Any], origin: str = "") -> dict[str, Any]:
    """The part of a model config that decides how an image becomes the network's input, with plain types.

    ``channel_order`` is included only when it is not RGB (see the module docstring).

    Args:
        model_config: a model config dict (see the module docstring).
        origin: where it came from (``ckpt=PATH``), to start an error message with; nothing when empty.

    Raises:
        ModelConfigError: a preprocessing key is missing or is not a number (a list of numbers for mean and std),
            or the channel order is neither RGB nor BGR.
    """
    where = f"{origin}: " if origin else ""
    missing = [k for k in PREPROCESSING_KEYS if k not in model_config]
    if missing:
        raise ModelConfigError(f"{where}the model config has no {', '.join(missing)}; cannot preprocess images for it")
    channel_order = model_config.get(CHANNEL_ORDER_KEY, DEFAULT_CHANNEL_ORDER)
    if channel_order not in CHANNEL_ORDERS:
        raise ModelConfigError(
            f"{where}the model config's channel_order {shorten(channel_order)} is not one of "
            f"{', '.join(CHANNEL_ORDERS)}; the file is damaged or not to be trusted"
        )
    try:
        return {
            "image_size": int(model_config["image_size"]),
            "resize_size": None if model_config["resize_size"] is None else int(model_config["resize_size"]),
            "mean": [float(v) for v in model_config["mean"]],
            "std": [float(v) for v in model_config["std"]],
            **_channel_order_entry(channel_order),
        }
    except (TypeError, ValueError, OverflowError):
        values = ", ".join(f"{key} {shorten(model_config[key])}" for key in PREPROCESSING_KEYS)
        raise ModelConfigError(
            f"{where}the model config's preprocessing is malformed ({values}): image_size and resize_size should be "
            "integers, mean and std lists of numbers; the file is damaged or not to be trusted"
        ) from None


def _channel_order_entry(channel_order: str) -> dict[str, str]:
    return {} if channel_order == DEFAULT_CHANNEL_ORDER else {CHANNEL_ORDER_KEY: channel_order}


@functools.cache
def allowed_model_targets() -> frozenset[str]:
    """Every ``_target_`` the project's backbone and head options name (and the pretrained backbones' head).

    These are the only callables a model config from a file (checkpoint, index) may have instantiated.
    """

    def targets(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
            return own + [t for value in node.values() for t in targets(value)]
        if isinstance(node, list):
            return [t for value in node for t in targets(value)]
        return []

    found = {NORMALIZE_HEAD_TARGET}
    for group in MODEL_PART_GROUPS:
        for path in (CONFIG_DIR / group).glob("*.yaml"):
            found.update(targets(OmegaConf.to_container(OmegaConf.load(path))))
    return frozenset(found)


def check_model_config(config: Any, origin: str) -> None:
    """Refuses a model config that would instantiate anything but the project's own model parts.

    Hydra instantiates the callable any ``_target_`` names, at any depth, and resolves ``${...}`` interpolations
    (environment variables among them): a config read from a file someone handed over must name only the
    targets of :func:`allowed_model_targets` and hold no interpolation.

    Raises:
        ModelConfigError: one line naming the first offending value and ``origin`` (the file it came from).
    """
    allowed = allowed_model_targets()
    pending, seen = [(config, "model_config")], 0
    while pending:
        node, where = pending.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ModelConfigError(
                f"{origin}: the model config is implausibly large; the file is damaged or not trusted"
            )
        if isinstance(node, dict):
            target = node.get("_target_")
            if "_target_" in node and target not in allowed:
                raise ModelConfigError(
                    f"{origin} asks to instantiate {shorten(target)} ({where}), which is not one of the project's "
                    f"model parts ({', '.join(sorted(allowed))}): refused, the file is damaged or not to be trusted"
                )
            pending.extend((value, f"{where}.{key}") for key, value in node.items())
        elif isinstance(node, list):
            pending.extend((value, f"{where}[{i}]") for i, value in enumerate(node))
        elif isinstance(node, str) and "${" in node:
            raise ModelConfigError(
                f"{origin}: the model config holds an interpolation {shorten(node)} ({where}): refused, the file is "
                "damaged or not to be trusted"
            )


@dataclass(frozen=True)
class ModelConfig:
    """How to rebuild an embedding network and feed it images, without the training config or Hydra.

    Attributes:
        backbone: the backbone's ``_target_`` config (plain dict).
        head: the head's ``_target_`` config, partial, with the backbone's feature size as ``in_features``.
        image_size: side of the square crop the network sees.
        resize_size: length the short side is resized to before the centre crop (None: ``image_size``).
        mean: per-channel mean the pixels are normalised with (in the network's channel order).
        std: per-channel standard deviation the pixels are normalised with (in the network's channel order).
        channel_order: ``RGB``, or ``BGR`` for a network that takes the channels reversed.
    """

    backbone: dict[str, Any]
    head: dict[str, Any]
    image_size: int
    resize_size: int | None
    mean: list[float]
    std: list[float]
    channel_order: str = DEFAULT_CHANNEL_ORDER

    @classmethod
    def describe(
        cls,
        model: EmbeddingModel,
        backbone_cfg: dict[str, Any],
        head_cfg: dict[str, Any],
        image_size: int,
        resize_size: int | None,
    ) -> ModelConfig:
        """The config of ``model``, built from ``backbone_cfg`` and ``head_cfg`` (plain dicts).

        The head records the backbone's feature size; mean, std and channel order are the backbone's own (its data
        config).
        """
        data = model.backbone.data_config
        return cls(
            backbone=copy.deepcopy(backbone_cfg),
            head={**copy.deepcopy(head_cfg), "in_features": int(model.backbone.num_features)},
            image_size=int(image_size),
            resize_size=None if resize_size is None else int(resize_size),
            mean=[float(v) for v in data["mean"]],
            std=[float(v) for v in data["std"]],
            channel_order=str(data.get(CHANNEL_ORDER_KEY, DEFAULT_CHANNEL_ORDER)),
        )

    @classmethod
    def from_dict(cls, config: Any, origin: str = "the model config") -> ModelConfig:
        """Reads the dict :meth:`to_dict` wrote (a checkpoint's, an index's), checking it can be trusted.

        Keys other than those :meth:`to_dict` writes are ignored; a config without ``channel_order`` means RGB.

        Args:
            config: the dict.
            origin: where it came from (``ckpt=PATH``), named in every error.

        Raises:
            ModelConfigError: it names something other than the project's model parts or holds an interpolation
                (see :func:`check_model_config`), or a section is missing or malformed.
        """
        check_model_config(config, origin)
        if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in MODEL_PART_GROUPS):
            raise ModelConfigError(f"{origin}: the model config has no backbone and head sections")
        for part in MODEL_PART_GROUPS:
            if "_target_" not in config[part]:
                raise ModelConfigError(
                    f"{origin}: the model config's {part} names no _target_ to build it from; the file is damaged "
                    "or not to be trusted"
                )
        return cls(
            backbone=copy.deepcopy(config["backbone"]),
            head=copy.deepcopy(config["head"]),
            **preprocessing_of(config, origin),
        )

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How an image becomes the network's input: ``image_size``, ``resize_size``, ``mean``, ``std`` and, when not
        RGB, ``channel_order`` (the keyword arguments of :func:`~metricsearch.data.transforms.build_eval_transform`).
        """
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            **_channel_order_entry(self.channel_order),
        }

    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored in checkpoints, index metadata and ONNX exports (JSON types only)."""
        return {"backbone": copy.deepcopy(self.backbone), "head": copy.deepcopy(self.head), **self.preprocessing}
