"""Augmentation of uint8 batches as tensors, on whatever device the batch is on (the GPU when training there).

The second half of the fast data path (:mod:`metricsearch.data.cache`): the DataLoader only gathers uint8 images
and draws each sample's crop box and flip; here the whole batch is cropped, resized, flipped and normalised at
once, with one ``affine_grid`` + ``grid_sample``. The crop boxes are the RandomResizedCrop boxes of the PIL path
(same sampler, same seeds), expressed as fractions of the original image, which is why they apply unchanged to
the squeezed square copies the cache stores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metricsearch.data.transforms import check_channel_order


class BatchAugment(nn.Module):
    """Crop + resize + flip + normalize for a batch of uint8 images, or just normalize for evaluation.

    Args:
        image_size: output side.
        mean: normalization mean (0-1 scale, in the network's channel order).
        std: normalization std (0-1 scale, in the network's channel order).
        channel_order: ``RGB``, or ``BGR`` to reverse the (RGB) cached channels before normalising.
    """

    def __init__(
        self, image_size: int, mean: Sequence[float], std: Sequence[float], channel_order: str = "RGB"
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.channel_order = check_channel_order(channel_order)
        std_tensor = torch.tensor(std, dtype=torch.float32)
        # Folded into one multiply-add: (x / 255 - mean) / std = x * scale + shift.
        self.register_buffer("scale", (1.0 / (255.0 * std_tensor)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "shift", (-torch.tensor(mean, dtype=torch.float32) / std_tensor).view(1, 3, 1, 1), persistent=False
        )

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.channel_order == "BGR":
            images = images.flip(1)
        return images * self.scale.to(images.device) + self.shift.to(images.device)

    def forward(self, images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Augments a training batch.

        Args:
            images: uint8, shape (B, H, W, 3).
            crops: float, shape (B, 4): each crop box as (x0, y0, x1, y1) fractions of the image.
            flips: bool, shape (B,): which samples to mirror.

        Returns:
            float32 (B, 3, image_size, image_size), normalised.
        """
        pixels = images.permute(0, 3, 1, 2).float()
        crops = crops.to(device=images.device, dtype=torch.float32)
        # grid_sample reads the input at normalised coordinates in [-1, 1] (pixel edges with align_corners=False):
        # output coordinate u maps to centre + half_width * u, mirrored by a negative half width.
        x0, y0, x1, y1 = crops.unbind(1)
        half_width = (x1 - x0) * torch.where(flips.to(images.device), -1.0, 1.0)
        theta = torch.zeros(len(images), 2, 3, device=images.device)
        theta[:, 0, 0] = half_width
        theta[:, 0, 2] = x0 + x1 - 1.0
        theta[:, 1, 1] = y1 - y0
        theta[:, 1, 2] = y0 + y1 - 1.0
        size = (len(images), 3, self.image_size, self.image_size)
        grid = F.affine_grid(theta, list(size), align_corners=False)
        # NOTE: "border" keeps edge pixels for sample positions that round past the image by a fraction.
        out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self._normalize(out)

    def normalize_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """An evaluation batch (already cropped by the cache): uint8 (B, H, W, 3) -> normalised float (B, 3, H, W)."""
        return self._normalize(images.permute(0, 3, 1, 2).float())
