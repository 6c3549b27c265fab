"""Any timm backbone by name, returning pooled features."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

# What the hub download raises when the weights are neither cached nor reachable (offline mode, no network,
# a URL-hosted file that cannot be fetched).
_UNREACHABLE_WEIGHTS = (LocalEntryNotFoundError, ConnectionError, TimeoutError, URLError)


class PretrainedWeightsError(FileNotFoundError):
    """Pretrained weights that are not on this machine: not in the hub cache and unreachable, or a missing file."""


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``forward`` returns pooled features of size ``num_features``.

    Args:
        model_name: any name ``timm.list_models()`` knows, e.g. ``resnet50`` or ``vit_small_patch16_224``.
        pretrained: load ImageNet weights (from the Hugging Face hub unless ``weights_file`` is given).
        weights_file: a local weights file, loaded offline instead of the hub.
        freeze_bn: keep BatchNorm layers in eval mode with frozen affine parameters, the usual choice when
            fine-tuning with small per-class batches (the running statistics stay those of ImageNet).
        img_size: input size for models that need it fixed at creation (ViTs); ignored by CNNs.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        weights_file: str | None = None,
        freeze_bn: bool = False,
        img_size: int | None = None,
    ) -> None:
        super().__init__()
        kwargs = {}
        if weights_file:
            path = Path(weights_file).expanduser()
            if not path.is_file():
                raise PretrainedWeightsError(
                    f"backbone.weights_file={weights_file} does not exist; give the path of a {model_name} weights "
                    "file, or train from scratch with backbone.pretrained=false backbone.weights_file=null"
                )
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
            pretrained = True
        if img_size is not None and "img_size" in _creation_args(model_name):
            kwargs["img_size"] = img_size
        try:
            self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        except _UNREACHABLE_WEIGHTS as err:
            raise PretrainedWeightsError(
                f"backbone {model_name} with backbone.pretrained=true needs its ImageNet weights from the internet "
                f"(Hugging Face hub), which cannot be reached and are not cached here ({type(err).__name__}): connect "
                "once (they are then cached), or pass a local copy with backbone.weights_file=PATH, or train from "
                "scratch with backbone.pretrained=false"
            ) from None
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(
                    f"backbone.model_name={model_name!r} is not a timm model; see timm.list_models('{model_name[:4]}*')"
                ) from err
            raise
        self.model_name = model_name
        self.num_features: int = self.model.num_features
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for module in self._batch_norms():
                for param in module.parameters():
                    param.requires_grad_(False)

    @property
    def data_config(self) -> dict:
        """Input size, interpolation, mean and std the backbone expects (timm's resolved data config)."""
        return timm.data.resolve_data_config({}, model=self.model)

    def _batch_norms(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        if self.freeze_bn:
            for module in self._batch_norms():
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _creation_args(model_name: str) -> set[str]:
    # ViT-style models accept img_size; CNNs raise on unknown kwargs, so only pass it where it is understood.
    name = model_name.split(".")[0]
    return {"img_size"} if any(k in name for k in ("vit", "deit", "eva", "swin", "beit")) else set()
