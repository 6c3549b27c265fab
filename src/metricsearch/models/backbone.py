"""Any timm backbone by name, returning pooled features; BN-Inception (:mod:`.bn_inception`) among them."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.layers import SelectAdaptivePool2d
from torch import nn

from metricsearch.models import bn_inception  # noqa: F401 - registers "bn_inception" with timm

# What the hub download raises when the weights are neither cached nor reachable (offline mode, no network,
# a URL-hosted file that cannot be fetched).
UNREACHABLE_WEIGHTS = (LocalEntryNotFoundError, ConnectionError, TimeoutError, URLError)

# none: BatchNorm trains as usual. stats: running statistics frozen (layers in eval mode), affine weights trained
# (Multi-Similarity's code). all: eval mode and frozen affine weights (Proxy-Anchor's --bn-freeze 1).
BN_FREEZE_MODES = ("none", "stats", "all")
# The one pooling choice of ours; every other value is timm's own (avg, max, avgmax = (avg + max) / 2, catavgmax,
# token for ViTs, ...) and goes to timm unchanged.
AVG_PLUS_MAX = "avg+max"


class PretrainedWeightsError(FileNotFoundError):
    """Pretrained weights that are not on this machine: not in the hub cache and unreachable, or a missing file."""


class AvgPlusMaxPool(nn.Module):
    """Global average pooling plus global max pooling, summed (Proxy-Anchor's ``code/net/resnet.py``).

    Not timm's ``avgmax``, which halves the sum; the factor matters to a following linear layer's initial scale.

    Args:
        flatten: return ``(B, C)`` rather than ``(B, C, 1, 1)``.
        input_fmt: ``NCHW`` or ``NHWC``, the layout of the feature map the model produces.
    """

    pool_type = AVG_PLUS_MAX

    def __init__(self, flatten: bool = True, input_fmt: str = "NCHW") -> None:
        super().__init__()
        self.flatten = flatten
        self.input_fmt = input_fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (2, 3) if self.input_fmt == "NCHW" else (1, 2)
        keep = not self.flatten
        pooled = x.mean(dims, keepdim=keep) + x.amax(dims, keepdim=keep)
        return pooled if self.flatten or self.input_fmt == "NCHW" else pooled.permute(0, 3, 1, 2)

    def feat_mult(self) -> int:
        return 1


def resolve_bn_freeze(bn_freeze: str | None, freeze_bn: bool | None) -> str:
    """The BatchNorm mode from ``bn_freeze`` and the deprecated boolean ``freeze_bn`` (true = ``all``).

    Model configs written before ``bn_freeze`` existed (in checkpoints and index folders) hold only ``freeze_bn``.

    Raises:
        ValueError: an unknown mode, or both given and contradicting each other.
    """
    if bn_freeze is not None and bn_freeze not in BN_FREEZE_MODES:
        raise ValueError(f"backbone.bn_freeze={bn_freeze!r} is not one of {', '.join(BN_FREEZE_MODES)}")
    if freeze_bn is None:
        return bn_freeze or "none"
    from_alias = "all" if freeze_bn else "none"
    if bn_freeze is not None and bn_freeze != from_alias:
        raise ValueError(
            f"backbone.freeze_bn={str(freeze_bn).lower()} (deprecated, means bn_freeze={from_alias}) contradicts "
            f"backbone.bn_freeze={bn_freeze}: drop freeze_bn (backbone.freeze_bn=null) and set bn_freeze to one of "
            f"{', '.join(BN_FREEZE_MODES)}"
        )
    return from_alias


def weights_source(model_name: str) -> str:
    """Where ``pretrained=true`` fetches the model's weights from: the Hugging Face hub, or a URL."""
    cfg = timm.models.get_pretrained_cfg(model_name, allow_unregistered=True)
    if cfg is not None and cfg.url and not cfg.hf_hub_id:
        return cfg.url
    return "Hugging Face hub"


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``forward`` returns pooled features of size ``num_features``.

    Args:
        model_name: any name ``timm.list_models()`` knows, e.g. ``resnet50.tv_in1k``, ``vit_small_patch16_224.dino``
            or ``bn_inception``.
        pretrained: load ImageNet weights (from the Hugging Face hub or the model's URL unless ``weights_file``
            is given).
        weights_file: a local weights file, loaded offline instead of the hub.
        bn_freeze: ``none``, ``stats`` (BatchNorm running statistics frozen, affine weights trained) or ``all``
            (statistics and affine weights frozen): fine-tuning with small per-class batches usually keeps
            ImageNet's statistics.
        global_pool: ``avg+max`` (average and max pooling summed, Proxy-Anchor's), or any of timm's choices for the
            model (``avg``, ``max``, ``avgmax``, ``catavgmax``; ``token`` or ``avg`` for ViTs); None keeps the
            model's own.
        img_size: input size for models that need it fixed at creation (ViTs); ignored by CNNs.
        freeze_patch_embed: keep a ViT's patch embedding (``patch_embed``) frozen for the whole run, as hyp_metric's
            ``--freeze 0`` does; the class token and position embeddings still train.
        freeze_bn: deprecated boolean form of ``bn_freeze`` (true = ``all``), still read from older model configs.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        weights_file: str | None = None,
        bn_freeze: str | None = None,
        global_pool: str | None = None,
        img_size: int | None = None,
        freeze_patch_embed: bool = False,
        freeze_bn: bool | None = None,
    ) -> None:
        super().__init__()
        self.bn_freeze = resolve_bn_freeze(bn_freeze, freeze_bn)
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
        if global_pool is not None and global_pool != AVG_PLUS_MAX:
            kwargs["global_pool"] = global_pool
        try:
            self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        except UNREACHABLE_WEIGHTS as err:
            raise PretrainedWeightsError(
                f"backbone {model_name} with backbone.pretrained=true needs its ImageNet weights from the internet "
                f"({weights_source(model_name)}), which cannot be reached and are not cached here "
                f"({type(err).__name__}): connect once (they are then cached), or pass a local copy with "
                "backbone.weights_file=PATH, or train from scratch with backbone.pretrained=false"
            ) from None
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(
                    f"backbone.model_name={model_name!r} is not a timm model; see timm.list_models('{model_name[:4]}*')"
                ) from err
            raise
        except (AssertionError, TypeError) as err:
            if "global_pool" not in kwargs:
                raise
            raise ValueError(
                f"backbone.global_pool={global_pool!r} is not a pooling {model_name} supports ({err}); use "
                f"{AVG_PLUS_MAX} (CNNs) or one of timm's: avg, max, avgmax, catavgmax (CNNs), token or avg (ViTs)"
            ) from None
        if global_pool == AVG_PLUS_MAX:
            self._use_avg_plus_max(model_name)
        self.model_name = model_name
        pool = getattr(self.model, "global_pool", None)
        # catavgmax concatenates the two poolings: twice the model's feature size.
        mult = pool.feat_mult() if isinstance(pool, SelectAdaptivePool2d | AvgPlusMaxPool) else 1
        self.num_features: int = self.model.num_features * mult
        if self.bn_freeze == "all":
            for module in self._batch_norms():
                for param in module.parameters():
                    param.requires_grad_(False)
        if freeze_patch_embed:
            patch_embed = getattr(self.model, "patch_embed", None)
            if patch_embed is None:
                raise ValueError(
                    f"backbone.freeze_patch_embed=true needs a vision transformer's patch embedding, and {model_name} "
                    "has none; set backbone.freeze_patch_embed=false"
                )
            for param in patch_embed.parameters():
                param.requires_grad_(False)

    def _use_avg_plus_max(self, model_name: str) -> None:
        pool = getattr(self.model, "global_pool", None)
        if not isinstance(pool, SelectAdaptivePool2d):
            raise ValueError(
                f"backbone.global_pool={AVG_PLUS_MAX} pools a CNN's feature map, and {model_name} has none to pool "
                f"(its pooling is {pool!r}); use one of its own choices (ViTs: token or avg) or a CNN backbone"
            )
        flatten = isinstance(pool.flatten, nn.Flatten) or bool(getattr(pool.pool, "flatten", False))
        self.model.global_pool = AvgPlusMaxPool(flatten=flatten, input_fmt=getattr(pool.pool, "input_fmt", "NCHW"))

    @property
    def global_pool(self) -> str:
        """The pooling in use (timm's name, or ``avg+max``)."""
        pool = getattr(self.model, "global_pool", None)
        return str(getattr(pool, "pool_type", pool))

    @property
    def data_config(self) -> dict:
        """Input size, interpolation, mean, std and channel order the backbone expects.

        timm's resolved data config plus ``channel_order`` (``RGB``, or ``BGR`` for Caffe-converted weights such as
        BN-Inception's); mean and std are in the model's channel order.
        """
        channel_order = getattr(self.model, "pretrained_cfg", {}).get("channel_order", "RGB")
        config = {**timm.data.resolve_data_config({}, model=self.model), "channel_order": channel_order}
        # A ViT built for another size (backbone.img_size) takes only that size, whatever its weights were made at.
        patch_embed = getattr(self.model, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
            config["input_size"] = (3, *img_size)
        return config

    def _batch_norms(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        if self.bn_freeze != "none":
            for module in self._batch_norms():
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _creation_args(model_name: str) -> set[str]:
    # ViT-style models accept img_size; CNNs raise on unknown kwargs, so only pass it where it is understood.
    name = model_name.split(".")[0]
    return {"img_size"} if any(k in name for k in ("vit", "deit", "eva", "swin", "beit")) else set()
