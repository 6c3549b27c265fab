"""The model config: one format for checkpoints, index metadata and ONNX exports, written by training and search
alike, read back with its checks; and the one place that builds the embedding network from it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from metricsearch.inference.errors import ModelLoadError
from metricsearch.inference.model_loading import load_embedder
from metricsearch.models.embedding_model import build_embedding_model
from metricsearch.models.model_config import ModelConfig, ModelConfigError
from metricsearch.utils.config import CONFIG_DIR, to_plain

# A model config exactly as training has stored it in checkpoints (hyper_parameters.model_config) and indexes have
# recorded it (model.model_config): resnet10t, a 16-d head, 32 px images. Files written so must stay loadable.
STORED = {
    "backbone": {
        "_target_": "metricsearch.models.backbone.TimmBackbone",
        "model_name": "resnet10t",
        "pretrained": False,
        "weights_file": None,
        "freeze_bn": False,
    },
    "head": {
        "_target_": "metricsearch.models.head.EmbeddingHead",
        "_partial_": True,
        "embedding_dim": 16,
        "batch_norm": False,
        "normalize": True,
        "in_features": 512,
    },
    "image_size": 32,
    "resize_size": None,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# The same network as training writes it now: BatchNorm mode, pooling and head initialisation spelled out
# (``freeze_bn: false`` became ``bn_freeze: none``); both forms load.
WRITTEN = {
    **STORED,
    "backbone": {
        **{k: v for k, v in STORED["backbone"].items() if k != "freeze_bn"},
        "bn_freeze": "none",
        "global_pool": None,
    },
    "head": {**STORED["head"], "init": "default"},
}


def training_parts() -> tuple:
    """The backbone and head configs a training run composes (``backbone=resnet10t head=linear``, 16-d)."""
    backbone = OmegaConf.load(CONFIG_DIR / "backbone" / "resnet10t.yaml")
    head = OmegaConf.load(CONFIG_DIR / "head" / "linear.yaml")
    head.embedding_dim = 16
    return backbone, head


def save_checkpoint(path, model_config: dict) -> str:
    """A checkpoint as training writes it, holding ``model_config`` and the weights of the stored network."""
    model = build_embedding_model(STORED["backbone"], STORED["head"])
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": model_config}}, path)
    return str(path)


def test_the_stored_format_reads_back_unchanged():
    config = ModelConfig.from_dict(copy.deepcopy(STORED), "ckpt=x")
    assert config.to_dict() == STORED
    assert json.loads(json.dumps(config.to_dict())) == STORED
    assert config.preprocessing == {k: STORED[k] for k in ("image_size", "resize_size", "mean", "std")}


def test_training_writes_the_stored_format():
    backbone_cfg, head_cfg = training_parts()
    model = build_embedding_model(backbone_cfg, head_cfg)
    backbone = {**to_plain(backbone_cfg), "pretrained": False, "weights_file": None}
    config = ModelConfig.describe(model, backbone, to_plain(head_cfg), image_size=32, resize_size=None)
    assert config.to_dict() == WRITTEN


def test_the_network_built_for_training_and_the_one_rebuilt_from_the_stored_config_are_the_same():
    trained = build_embedding_model(*training_parts())
    rebuilt = build_embedding_model(STORED["backbone"], STORED["head"])
    assert {k: v.shape for k, v in trained.state_dict().items()} == {
        k: v.shape for k, v in rebuilt.state_dict().items()
    }
    assert trained.embedding_dim == rebuilt.embedding_dim == 16


def test_a_stored_checkpoint_loads_with_its_config_as_written(tmp_path):
    embedder = load_embedder(ckpt=save_checkpoint(tmp_path / "model.ckpt", copy.deepcopy(STORED)))
    assert embedder.model_config == STORED and embedder.embedding_dim == 16


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (lambda c: c["backbone"].update(_target_="builtins.eval"), "asks to instantiate 'builtins.eval'"),
        (lambda c: c["head"].update(embedding_dim="${oc.env:HOME}"), "holds an interpolation"),
        (lambda c: c.pop("head"), "has no backbone and head sections"),
        (lambda c: c.pop("mean"), "has no mean; cannot preprocess images for it"),
    ],
    ids=["foreign-target", "interpolation", "no-head", "no-mean"],
)
def test_a_config_from_a_file_is_checked_before_use(change, refused):
    config = copy.deepcopy(STORED)
    change(config)
    with pytest.raises(ModelConfigError, match=refused) as info:
        ModelConfig.from_dict(config, "ckpt=x")
    assert str(info.value).startswith("ckpt=x")


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (lambda c: c.update(image_size="big"), "the model config's preprocessing is malformed (image_size 'big'"),
        (lambda c: c.update(mean=None), "the model config's preprocessing is malformed ("),
        (lambda c: c["backbone"].pop("_target_"), "the model config's backbone names no _target_"),
        (lambda c: c["head"].pop("_target_"), "the model config's head names no _target_"),
    ],
    ids=["image-size-text", "mean-null", "backbone-no-target", "head-no-target"],
)
def test_a_checkpoint_with_a_malformed_model_config_is_refused_in_one_line(change, refused, tmp_path):
    """Was a ValueError, TypeError or AttributeError from deep inside the loading (a traceback from the CLI)."""
    config = copy.deepcopy(STORED)
    change(config)
    ckpt = save_checkpoint(tmp_path / "damaged.ckpt", config)
    with pytest.raises(ModelLoadError, match=refused.replace("(", r"\(")) as info:
        load_embedder(ckpt=ckpt)
    message = str(info.value)
    assert message.startswith("ckpt=") and message.split(":")[0].endswith("damaged.ckpt") and "\n" not in message
