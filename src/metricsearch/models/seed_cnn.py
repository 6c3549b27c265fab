"""The small CNN of the Keras example "Metric learning for image similarity search" (Kelcey 2020, keras.io).

Three 3x3 stride-2 convolutions with 32, 64 and 128 filters, each followed by a ReLU, and global average pooling:
128 pooled features. Keras' ``Conv2D`` pads ``valid`` by default, so a 32x32 CIFAR image becomes 15x15, 7x7, then
3x3 feature maps. The example feeds raw pixels scaled to [0, 1] (``x.astype("float32") / 255.0``): the data config
has mean 0 and std 1, which the data pipeline reads as "no normalisation beyond the [0, 1] scaling".

The example's own head, a linear layer to 8 dimensions followed by L2 normalisation, is ``head=linear`` with
``head.embedding_dim=8``.
"""

from __future__ import annotations

import torch
from torch import nn

# Filters of the three convolutions, as in the example.
SEED_CNN_CHANNELS = (32, 64, 128)


class SeedCNN(nn.Module):
    """The example's convolutional network without its head: ``forward`` returns pooled features of size 128.

    Args:
        image_size: the side of the square images it is meant for (the example's CIFAR-10: 32), reported in
            :attr:`data_config`; the network itself takes any size of at least 15 px, and training uses the data's.
        pretrained: there are no pretrained weights for this network; true is refused.
        weights_file: likewise refused when given; the keyword exists because training records every backbone
            with ``pretrained=false weights_file=null``.
    """

    def __init__(self, image_size: int = 32, pretrained: bool = False, weights_file: str | None = None) -> None:
        super().__init__()
        if pretrained or weights_file:
            raise ValueError(
                "backbone=seed_cnn has no pretrained weights (the example trains it from scratch): set "
                "backbone.pretrained=false backbone.weights_file=null"
            )
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in SEED_CNN_CHANNELS:
            # NOTE: padding 0 is Keras' default "valid" padding, which the example uses.
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0), nn.ReLU()]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.image_size = int(image_size)
        self.num_features: int = in_channels
        self._init_like_keras()

    def _init_like_keras(self) -> None:
        # Keras' Conv2D defaults: Glorot-uniform kernels and zero biases (PyTorch's default differs).
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def data_config(self) -> dict:
        """Input size, interpolation, mean, std and channel order, in the keys of timm's data config.

        Mean 0 and std 1: the network sees pixels scaled to [0, 1], as in the example.
        """
        return {
            "input_size": (3, self.image_size, self.image_size),
            "interpolation": "bilinear",
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
            "crop_pct": 1.0,
            "crop_mode": "center",
            "channel_order": "RGB",
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).mean(dim=(2, 3))
