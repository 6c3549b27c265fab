"""BN-Inception (Inception v2) as a timm model: ``timm.create_model("bn_inception", ...)``.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
ICML 2015: GoogLeNet with BatchNorm after every convolution, the 5x5 branches replaced by two stacked 3x3s, and
strided reduction blocks (3c, 4e) without a 1x1 branch. It is the backbone of the Multi-Similarity, Proxy-Anchor
(SOP, In-Shop) and "Metric Learning Reality Check" results.

The layers are named as in the widely used ImageNet weights converted from Caffe (Cadene's pretrainedmodels file
``bn_inception-52deb4733.pth``: ``conv1_7x7_s2.weight``, ``inception_3a_1x1_bn.running_mean``, ...,
``last_linear.weight``), so that file loads as it is (:func:`load_bn_inception_weights`). Those weights expect BGR
input on a 0-255 scale minus the mean [104, 117, 128] (BGR order), std 1: the pretrained config says so in timm's
0-1 convention (mean / 255, std 1 / 255) and adds ``channel_order: "BGR"``, which the data pipeline applies.

Importing this module registers the model with timm (:class:`~metricsearch.models.backbone.TimmBackbone` does).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from metricsearch.utils.config import ConfigError

WEIGHTS_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
# The Caffe model's preprocessing in timm's convention: (x / 255 - mean) / std == x * 255 - [104, 117, 128].
CAFFE_MEAN_BGR = (104.0, 117.0, 128.0)
CHANNEL_ORDER = "BGR"
NUM_FEATURES = 1024
CLASSIFIER = "last_linear"


class WeightsFileError(ConfigError):
    """A weights file that is not BN-Inception's: the message names the missing, unexpected or misshapen tensors."""


class _Mixed(NamedTuple):
    """One Inception block: its channel counts; 0 for a branch the block does not have.

    Reduction blocks (``stride`` 2) have no 1x1 branch, stride their 3x3s and max-pool without a projection.
    """

    name: str
    in_channels: int
    conv1x1: int
    reduce3x3: int
    conv3x3: int
    reduce_double: int
    conv_double: int
    pool: str
    pool_proj: int
    stride: int = 1


# The ten blocks of the network (Ioffe & Szegedy 2015, Figure 5; channel counts as in the released weights).
BLOCKS = (
    _Mixed("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    _Mixed("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    _Mixed("3c", 320, 0, 128, 160, 64, 96, "max", 0, stride=2),
    _Mixed("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    _Mixed("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    _Mixed("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    _Mixed("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    _Mixed("4e", 608, 0, 128, 192, 192, 256, "max", 0, stride=2),
    _Mixed("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    _Mixed("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)


class _ConvBN(NamedTuple):
    conv: nn.Conv2d
    bn: nn.BatchNorm2d

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class _BlockLayers(NamedTuple):
    conv1x1: _ConvBN | None
    reduce3x3: _ConvBN
    conv3x3: _ConvBN
    reduce_double: _ConvBN
    double_1: _ConvBN
    double_2: _ConvBN
    pool: nn.Module
    pool_proj: _ConvBN | None


class BNInception(nn.Module):
    """BN-Inception with timm's model interface (``forward_features``, ``forward_head``, ``reset_classifier``).

    Every layer is an attribute of the model itself, under the released weights' flat names; ``forward`` reaches
    them through per-block tuples of references built once in ``__init__``.

    Args:
        num_classes: classifier outputs; 0 for pooled features (``num_features`` = 1024).
        in_chans: input channels (3 for the ImageNet weights).
        global_pool: timm's pooling choice (``avg``, ``max``, ``avgmax``, ``catavgmax``, ``""`` for none).
        drop_rate: dropout before the classifier.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = NUM_FEATURES
        self.drop_rate = drop_rate
        self._stem = (
            self._conv_bn("conv1_7x7_s2", in_chans, 64, 7, stride=2),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            self._conv_bn("conv2_3x3_reduce", 64, 64, 1),
            self._conv_bn("conv2_3x3", 64, 192, 3),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
        )
        self._blocks = [self._block(spec) for spec in BLOCKS]
        self.global_pool, self.last_linear = create_classifier(NUM_FEATURES, num_classes, pool_type=global_pool)
        self.feature_info = [dict(num_chs=NUM_FEATURES, reduction=32, module="inception_5b_pool_proj_bn")]

    def _conv_bn(self, name: str, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> _ConvBN:
        conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
        bn = nn.BatchNorm2d(out_channels)
        self.add_module(name, conv)
        self.add_module(f"{name}_bn", bn)
        return _ConvBN(conv, bn)

    def _block(self, spec: _Mixed) -> _BlockLayers:
        prefix, cin = f"inception_{spec.name}", spec.in_channels
        # Created in the released file's order: 1x1, 3x3, double 3x3, pool branch.
        conv1x1 = self._conv_bn(f"{prefix}_1x1", cin, spec.conv1x1, 1) if spec.conv1x1 else None
        reduce3x3 = self._conv_bn(f"{prefix}_3x3_reduce", cin, spec.reduce3x3, 1)
        conv3x3 = self._conv_bn(f"{prefix}_3x3", spec.reduce3x3, spec.conv3x3, 3, stride=spec.stride)
        reduce_double = self._conv_bn(f"{prefix}_double_3x3_reduce", cin, spec.reduce_double, 1)
        double_1 = self._conv_bn(f"{prefix}_double_3x3_1", spec.reduce_double, spec.conv_double, 3)
        double_2 = self._conv_bn(f"{prefix}_double_3x3_2", spec.conv_double, spec.conv_double, 3, stride=spec.stride)
        if spec.stride == 2:
            pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        elif spec.pool == "max":
            pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        else:
            pool = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        pool_proj = self._conv_bn(f"{prefix}_pool_proj", cin, spec.pool_proj, 1) if spec.pool_proj else None
        return _BlockLayers(conv1x1, reduce3x3, conv3x3, reduce_double, double_1, double_2, pool, pool_proj)

    @staticmethod
    def _run_block(layers: _BlockLayers, x: torch.Tensor) -> torch.Tensor:
        branches = [] if layers.conv1x1 is None else [layers.conv1x1(x)]
        branches.append(layers.conv3x3(layers.reduce3x3(x)))
        branches.append(layers.double_2(layers.double_1(layers.reduce_double(x))))
        pooled = layers.pool(x)
        branches.append(pooled if layers.pool_proj is None else layers.pool_proj(pooled))
        try:
            return torch.cat(branches, 1)
        except RuntimeError as err:
            # NOTE: the ceil-mode max pool and the strided 3x3 of a reduction block disagree on odd sizes, as in the
            # Caffe model; 224 and 227 (the papers' sizes) and every multiple of 32 work.
            shapes = ", ".join("x".join(str(int(d)) for d in b.shape[-2:]) for b in branches)
            raise ValueError(
                f"BN-Inception cannot take this input size: a block gets a {x.shape[-2]}x{x.shape[-1]} map and its "
                f"branches give {shapes}; use an image size like 224, 227 or a multiple of 32"
            ) from err

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last Inception block's map, ``(B, 1024, H/32, W/32)``."""
        for layer in self._stem:
            x = layer(x)
        for layers in self._blocks:
            x = self._run_block(layers, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.last_linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.last_linear = create_classifier(NUM_FEATURES, num_classes, pool_type=pool_type)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": WEIGHTS_URL,
        "num_classes": 1000,
        # NOTE: 224 as in the released file's settings; Multi-Similarity and the Reality Check train and test at 227,
        # which their recipes set with data.image_size (the network takes either: both end in a 7x7 map).
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": tuple(m / 255 for m in CAFFE_MEAN_BGR),
        "std": (1 / 255,) * 3,
        "first_conv": "conv1_7x7_s2",
        "classifier": CLASSIFIER,
        "license": "unknown (converted from the Caffe model of Xiong et al.)",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"bn_inception.caffe_in1k": _cfg()})


def _weights_location(pretrained_cfg: dict[str, Any]) -> str:
    return str(pretrained_cfg.get("file") or pretrained_cfg.get("url") or WEIGHTS_URL)


def read_weights(location: str) -> dict[str, torch.Tensor]:
    """The state dict in a local file, or at a URL through torch's hub cache (downloaded once, then offline).

    Raises:
        WeightsFileError: the file is not a readable state dict.
        URLError, ConnectionError, TimeoutError: the URL cannot be reached and the file is not cached.
    """
    try:
        if "://" in location:
            state = torch.hub.load_state_dict_from_url(location, map_location="cpu", progress=False, weights_only=True)
        else:
            # weights_only: a weights file is data; never run code from a file someone handed over.
            state = torch.load(Path(location).expanduser(), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise WeightsFileError(
            f"backbone.weights_file={location} is not a readable PyTorch state dict ({type(err).__name__}); give "
            "BN-Inception's ImageNet weights (bn_inception-52deb4733.pth)"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"backbone.weights_file={location} holds no state dict of tensors")
    return state


def fit_weights(state: dict[str, torch.Tensor], model: BNInception, location: str) -> dict[str, torch.Tensor]:
    """``state`` (the released file's tensors) as the full state dict of ``model``, every feature tensor checked.

    The classifier is taken when the model has one of the same shape, left out otherwise. BatchNorm's
    ``num_batches_tracked`` (which the file predates) keeps the model's value. The released file stores the
    BatchNorm vectors as ``(1, C)``: a leading 1 is dropped.

    Raises:
        WeightsFileError: tensors missing, unexpected or of another shape; the message names examples of each.
    """
    expected = model.state_dict()
    fitted, missing, wrong_shape = {}, [], []
    for name, target in expected.items():
        if name.endswith("num_batches_tracked") and name not in state:
            fitted[name] = target
            continue
        if name not in state:
            missing.append(name)
            continue
        tensor = state[name]
        if tensor.dim() == target.dim() + 1 and tensor.shape[0] == 1:
            tensor = tensor.squeeze(0)
        if tuple(tensor.shape) != tuple(target.shape):
            if name.startswith(f"{CLASSIFIER}."):
                fitted[name] = target
                continue
            wrong_shape.append(f"{name} {tuple(state[name].shape)} vs {tuple(target.shape)}")
            continue
        fitted[name] = tensor.to(target.dtype)
    unexpected = [k for k in state if k not in expected and not k.startswith(f"{CLASSIFIER}.")]
    if missing or unexpected or wrong_shape:
        examples = "; ".join([*wrong_shape[:2], *(f"missing {k}" for k in missing[:2]), *unexpected[:2]])
        raise WeightsFileError(
            f"{location} is not BN-Inception's weights file: {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(wrong_shape)} wrongly shaped tensors (e.g. {examples}); give bn_inception-52deb4733.pth (Cadene's "
            "pretrainedmodels release) or train from scratch with backbone.pretrained=false"
        )
    return fitted


def load_bn_inception_weights(model: BNInception, location: str) -> None:
    """Fills ``model`` with the weights at ``location`` (a file or a URL); see :func:`fit_weights`."""
    model.load_state_dict(fit_weights(read_weights(location), model, location), strict=True)


@register_model
def bn_inception(pretrained: bool = False, **kwargs: Any) -> BNInception:
    """BN-Inception; ``pretrained`` loads the ImageNet weights from ``pretrained_cfg_overlay=dict(file=...)`` or the
    release URL (cached by torch's hub). The pretrained config gains ``channel_order: "BGR"``."""
    model = build_model_with_cfg(BNInception, "bn_inception", pretrained=False, **kwargs)
    if pretrained:
        load_bn_inception_weights(model, _weights_location(model.pretrained_cfg))
    # NOTE: timm's PretrainedCfg has no field for the channel order, so it is added to the model's resolved copy.
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "channel_order": CHANNEL_ORDER}
    return model
