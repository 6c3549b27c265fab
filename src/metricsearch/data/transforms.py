"""Train and evaluation transforms of the metric-learning recipe."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_train_transform(
    image_size: int,
    scale: Sequence[float] = (0.16, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """RandomResizedCrop + optional horizontal flip + normalization (the usual recipe at 224)."""
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BILINEAR)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def build_eval_transform(
    image_size: int,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Resize the short side to ``resize_size`` then centre-crop ``image_size`` (256 -> 224 in the recipe)."""
    resize_size = resize_size or image_size
    return T.Compose(
        [
            T.Resize(resize_size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
