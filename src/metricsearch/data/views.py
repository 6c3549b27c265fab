"""Self-supervision: two augmented views of every image, the positive pair of contrastive learning.

The view augmentation is the one SimCLR (Chen et al. 2020, ICML) introduced and MoCo v2 (Chen et al. 2020,
arXiv:2003.04297), BYOL and VICReg (Bardes et al. 2022, ICLR) kept: random resized crop, horizontal flip, colour
jitter (brightness, contrast, saturation 0.4, hue 0.1, with probability 0.8, in random order), grayscale (0.2) and
Gaussian blur (sigma 0.1-2, with probability 0.5; kernel a tenth of the side). Every draw comes from a generator
seeded per sample, as for the supervised training transform, so views do not depend on workers or resumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from metricsearch.data.dataset import INDEX, Item, _split_items
from metricsearch.data.io import load_rgb_image
from metricsearch.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ToChannelOrder,
    rng_from_torch,
    sample_resized_crop,
)

# Key of a self-supervised batch: the two views, (2, B, 3, H, W); view one is [0], view two [1].
VIEWS = "views"


class ViewTransform:
    """One random view of an image (SimCLR / MoCo v2 augmentation), drawn from the generator it is given.

    Args:
        image_size: output side.
        scale: range of the crop area as a fraction of the image (SimCLR 0.08-1, MoCo v2 0.2-1).
        hflip: flip half of the views horizontally.
        color_jitter: brightness, contrast, saturation and hue strengths.
        color_jitter_p: probability of the colour jitter.
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of the Gaussian blur.
        blur_sigma: range of the blur's sigma, in pixels of a 224 image (scaled to ``image_size``).
        mean: normalization mean, in the network's channel order.
        std: normalization std, in the network's channel order.
        channel_order: ``RGB``, or ``BGR`` for networks that take the channels reversed.
    """

    def __init__(
        self,
        image_size: int,
        scale: Sequence[float] = (0.2, 1.0),
        hflip: bool = True,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channel_order: str = "RGB",
    ) -> None:
        for name, p in (("color_jitter_p", color_jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"supervision.views.{name}={p} is not a probability; set it in [0, 1]")
        if len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5:
            raise ValueError(
                f"supervision.views.color_jitter={list(color_jitter)} must be four strengths (brightness, contrast, "
                "saturation >= 0, hue in [0, 0.5]), e.g. [0.4, 0.4, 0.4, 0.1]"
            )
        self.image_size = image_size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.color_jitter = tuple(float(v) for v in color_jitter)
        self.color_jitter_p = color_jitter_p
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        # NOTE: the published sigma range is for 224-pixel views; scaled with the side so small images blur alike.
        self.blur_sigma = tuple(float(s) * image_size / 224 for s in blur_sigma)
        self.kernel_size = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        self.mean = list(mean)
        self.std = list(std)
        self.to_channel_order = ToChannelOrder(channel_order)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        top, left, height, width = sample_resized_crop(image.width, image.height, self.scale, rng)
        size = [self.image_size, self.image_size]
        image = TF.resized_crop(image, top, left, height, width, size, T.InterpolationMode.BILINEAR, antialias=True)
        # NOTE: every random number is drawn whether or not its operation applies, so one setting does not shift
        # the draws of the others.
        flip = rng.random() < 0.5
        jitter = rng.random() < self.color_jitter_p
        order = rng.permutation(4)
        brightness, contrast, saturation = (rng.uniform(max(0.0, 1 - s), 1 + s) for s in self.color_jitter[:3])
        hue = rng.uniform(-self.color_jitter[3], self.color_jitter[3])
        gray = rng.random() < self.grayscale_p
        blur = rng.random() < self.blur_p
        sigma = rng.uniform(*self.blur_sigma)
        if flip and self.hflip:
            image = TF.hflip(image)
        if jitter:
            adjust = (
                lambda im: TF.adjust_brightness(im, brightness),
                lambda im: TF.adjust_contrast(im, contrast),
                lambda im: TF.adjust_saturation(im, saturation),
                lambda im: TF.adjust_hue(im, hue),
            )
            for step in order:
                image = adjust[step](image)
        if gray:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        tensor = TF.to_tensor(image)
        if blur:
            tensor = TF.gaussian_blur(tensor, [self.kernel_size, self.kernel_size], [sigma, sigma])
        return TF.normalize(self.to_channel_order(tensor), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, hflip={self.hflip}, "
            f"color_jitter={self.color_jitter} p={self.color_jitter_p}, grayscale_p={self.grayscale_p}, "
            f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma})"
        )


class TwoViewDataset(torch.utils.data.Dataset):
    """Unlabelled images, each returned as two independent views: ``{VIEWS: (2, B, 3, H, W), INDEX: (B,)}``.

    Items are whole batches of ``(index, seed)`` pairs; both views of a sample come from its seed. It holds the
    image paths only: no class label is stored or returned.
    """

    def __init__(self, paths: Sequence[str | object], transform: ViewTransform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        indices, seeds = _split_items(list(items))
        first, second = [], []
        for index, seed in zip(indices, seeds, strict=True):
            rng = np.random.default_rng(seed) if seed is not None else rng_from_torch()
            image = load_rgb_image(self.paths[index])
            first.append(self.transform(image, rng))
            second.append(self.transform(image, rng))
        return {VIEWS: torch.stack([torch.stack(first), torch.stack(second)]), INDEX: torch.tensor(indices)}
