"""Train and evaluation transforms of the metric-learning recipe.

The training transform draws its randomness from a generator it is given, not from the global RNG: the datasets
seed that generator per sample from (seed, epoch, rank, batch, position), so the augmentation of a sample does
not depend on DataLoader workers or on whether a run was resumed. The crop is drawn by :func:`sample_resized_crop`,
which the uint8-cache path (:mod:`metricsearch.data.gpu_augment`) uses too, so both paths augment alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The channel order a network takes: RGB (almost all), or BGR (weights converted from Caffe, e.g. BN-Inception's).
# Mean and std are always given in the network's channel order.
CHANNEL_ORDERS = ("RGB", "BGR")
# RandomResizedCrop's default aspect-ratio range.
CROP_RATIO = (3 / 4, 4 / 3)


def sample_resized_crop(
    width: int,
    height: int,
    scale: Sequence[float],
    rng: np.random.Generator,
    ratio: Sequence[float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """Draws a RandomResizedCrop box the way torchvision does, from ``rng``.

    Up to ten tries for a box of area ``scale`` x the image's and a log-uniform aspect ratio that fits inside;
    failing that, the largest centred box whose aspect ratio is within ``ratio``.

    Returns:
        ``(top, left, box_height, box_width)`` in pixels of the image.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            return top, left, box_height, box_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        box_width, box_height = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        box_width, box_height = round(height * max(ratio)), height
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def check_channel_order(channel_order: str) -> str:
    """``channel_order`` if it is one of ``CHANNEL_ORDERS``.

    Raises:
        ValueError: any other value.
    """
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(
            f"channel_order={channel_order!r} is not one of {', '.join(CHANNEL_ORDERS)} (the backbone's data config "
            "says which its weights expect)"
        )
    return channel_order


class ToChannelOrder:
    """An RGB tensor ``(3, H, W)`` (or ``(B, 3, H, W)``) in the network's channel order (reversed for BGR)."""

    def __init__(self, channel_order: str = "RGB") -> None:
        self.channel_order = check_channel_order(channel_order)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flip(-3) if self.channel_order == "BGR" else tensor

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.channel_order})"


def rng_from_torch() -> np.random.Generator:
    """A generator seeded from torch's global RNG: for callers that pass no seed (follows ``seed_everything``)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


class TrainTransform:
    """RandomResizedCrop + optional horizontal flip + normalization, with the randomness passed in.

    Args:
        image_size: output side.
        scale: range of the crop area as a fraction of the image.
        hflip: flip half of the images horizontally.
        mean: normalization mean (0-1 scale, in the network's channel order).
        std: normalization std (0-1 scale, in the network's channel order).
        channel_order: ``RGB``, or ``BGR`` for networks that take the channels reversed.
    """

    def __init__(
        self,
        image_size: int,
        scale: Sequence[float] = (0.16, 1.0),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channel_order: str = "RGB",
    ) -> None:
        self.image_size = image_size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.mean = list(mean)
        self.std = list(std)
        self.to_channel_order = ToChannelOrder(channel_order)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Augments one image; ``rng`` defaults to one seeded from torch's global RNG."""
        rng = rng_from_torch() if rng is None else rng
        top, left, height, width = sample_resized_crop(image.width, image.height, self.scale, rng)
        size = [self.image_size, self.image_size]
        image = TF.resized_crop(image, top, left, height, width, size, T.InterpolationMode.BILINEAR, antialias=True)
        # NOTE: the flip is drawn even when it is off, so switching it does not shift the other draws.
        if rng.random() < 0.5 and self.hflip:
            image = TF.hflip(image)
        return TF.normalize(self.to_channel_order(TF.to_tensor(image)), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, hflip={self.hflip}, "
            f"mean={self.mean}, std={self.std}, channel_order={self.to_channel_order.channel_order})"
        )


def build_train_transform(
    image_size: int,
    scale: Sequence[float] = (0.16, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channel_order: str = "RGB",
) -> TrainTransform:
    """RandomResizedCrop + optional horizontal flip + normalization (the usual recipe at 224)."""
    return TrainTransform(image_size, scale, hflip, mean, std, channel_order)


def build_eval_resize(image_size: int, resize_size: int | None = None) -> T.Compose:
    """The deterministic geometric part of evaluation: resize the short side, then centre-crop (PIL in and out).

    The uint8 cache stores exactly its output, so cached evaluation sees the same pixels as the PIL path.
    """
    resize_size = resize_size or image_size
    return T.Compose([T.Resize(resize_size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(image_size)])


def build_eval_transform(
    image_size: int,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channel_order: str = "RGB",
) -> T.Compose:
    """Resize the short side to ``resize_size`` then centre-crop ``image_size`` (256 -> 224 in the recipe).

    ``mean`` and ``std`` are in the network's ``channel_order``; for BGR the channels are reversed before them.
    """
    to_tensor = [T.ToTensor()] if check_channel_order(channel_order) == "RGB" else [T.ToTensor(), ToChannelOrder("BGR")]
    return T.Compose([*build_eval_resize(image_size, resize_size).transforms, *to_tensor, T.Normalize(mean, std)])
