"""The Keras CIFAR-10 example's parts: its small CNN (``backbone=seed_cnn``) and its anchor/positive softmax loss
(``loss=anchor_positive_softmax``), checked against hand computations."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from metricsearch.models.embedding_model import build_embedding_model
from metricsearch.models.losses import AnchorPositiveSoftmaxLoss, pair_anchors_with_positives
from metricsearch.models.model_config import ModelConfig
from metricsearch.models.seed_cnn import SeedCNN
from metricsearch.pipelines.train import build_run
from metricsearch.utils.config import instantiate_partial_with, to_plain
from metricsearch.utils.trainer_settings import quiet_trainer_settings
from tests.helpers import compose_config

# conv 3x3x3 -> 32, 3x3x32 -> 64, 3x3x64 -> 128, each with a bias: 896 + 18,496 + 73,856.
SEED_CNN_PARAMETERS = (3 * 3 * 3 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (3 * 3 * 64 * 128 + 128)


def test_seed_cnn_feature_maps_and_pooled_features():
    torch.manual_seed(0)
    backbone = SeedCNN()
    images = torch.rand(2, 3, 32, 32)
    sizes, x = [], images
    for layer in backbone.features:
        x = layer(x)
        if isinstance(layer, torch.nn.Conv2d):
            sizes.append(tuple(x.shape[1:]))
    # Keras' valid padding: (32 - 3) // 2 + 1 = 15, then 7, then 3.
    assert sizes == [(32, 15, 15), (64, 7, 7), (128, 3, 3)]
    features = backbone(images)
    assert features.shape == (2, 128) and backbone.num_features == 128
    # By hand: the three convolutions without padding, ReLU after each, the spatial mean.
    convs = [m for m in backbone.features if isinstance(m, torch.nn.Conv2d)]
    x = images
    for conv in convs:
        x = F.relu(F.conv2d(x, conv.weight, conv.bias, stride=2, padding=0))
    torch.testing.assert_close(features, x.mean(dim=(2, 3)))


def test_seed_cnn_parameter_count_and_keras_initialisation():
    backbone = SeedCNN()
    assert sum(p.numel() for p in backbone.parameters()) == SEED_CNN_PARAMETERS == 93_248
    assert all(torch.count_nonzero(m.bias) == 0 for m in backbone.features if isinstance(m, torch.nn.Conv2d))


def test_seed_cnn_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="backbone.pretrained=false"):
        SeedCNN(pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        SeedCNN(weights_file="weights.pth")


def test_seed_cnn_builds_from_the_config_and_round_trips_through_a_model_config(tmp_path):
    cfg = compose_config(["backbone=seed_cnn", "head=linear", "head.embedding_dim=8"], tmp_path, tmp_path)
    model = build_embedding_model(cfg.backbone, cfg.head)
    assert isinstance(model.backbone, SeedCNN)
    data = model.backbone.data_config
    assert data["input_size"] == (3, 32, 32)
    assert list(data["mean"]) == [0.0, 0.0, 0.0] and list(data["std"]) == [1.0, 1.0, 1.0]
    model.eval()
    images = torch.rand(3, 3, 32, 32)
    embeddings = model(images)
    assert embeddings.shape == (3, 8)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))

    # What training stores in a checkpoint, read back through the trust check that admits only conf/ targets.
    stored = ModelConfig.describe(
        model,
        backbone_cfg={**to_plain(cfg.backbone), "pretrained": False, "weights_file": None},
        head_cfg=to_plain(cfg.head),
        image_size=32,
        resize_size=32,
    ).to_dict()
    config = ModelConfig.from_dict(stored, origin="ckpt=test")
    assert config.mean == [0.0, 0.0, 0.0] and config.std == [1.0, 1.0, 1.0]
    rebuilt = build_embedding_model(config.backbone, config.head)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(images), embeddings)


def reference_loss(embeddings: np.ndarray, anchors: list[int], positives: list[int], temperature: float) -> float:
    """The example's loss written out: logits A P^T / t, softmax over each row, mean of -log of the diagonal."""
    logits = embeddings[anchors] @ embeddings[positives].T / temperature
    total = 0.0
    for i in range(len(anchors)):
        row = logits[i] - logits[i].max()
        total += -(row[i] - np.log(np.exp(row).sum()))
    return total / len(anchors)


def test_anchor_positive_softmax_equals_the_formula_on_interleaved_labels():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(8, 5))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = torch.tensor([7, 2, 7, 0, 5, 2, 0, 5])
    # First occurrence of each label is its anchor, the second its positive (listed in label order 0, 2, 5, 7).
    anchors, positives = [3, 1, 4, 0], [6, 5, 7, 2]
    got_anchors, got_positives = pair_anchors_with_positives(labels)
    assert got_anchors.tolist() == anchors and got_positives.tolist() == positives
    loss = AnchorPositiveSoftmaxLoss(temperature=0.2)
    value = loss(torch.tensor(embeddings, dtype=torch.float64), labels)
    assert value.item() == pytest.approx(reference_loss(embeddings, anchors, positives, 0.2), rel=1e-10)
    # The loss is not symmetric in anchors and positives: the pairing direction is what the formula fixes.
    swapped = reference_loss(embeddings, positives, anchors, 0.2)
    assert value.item() != pytest.approx(swapped, rel=1e-6)
    # Another temperature, another value, still the formula's.
    other = AnchorPositiveSoftmaxLoss(temperature=0.5)(torch.tensor(embeddings), labels)
    assert other.item() == pytest.approx(reference_loss(embeddings, anchors, positives, 0.5), rel=1e-10)


def test_anchor_positive_softmax_gradients_flow():
    torch.manual_seed(0)
    raw = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    AnchorPositiveSoftmaxLoss()(F.normalize(raw, dim=1), labels).backward()
    assert torch.isfinite(raw.grad).all()
    # Every anchor and every positive gets a gradient.
    assert (raw.grad.norm(dim=1) > 0).all()


@pytest.mark.parametrize("labels", [[0, 0, 0, 1, 1, 1], [0, 0, 1, 2, 2], [0, 1, 2, 3]])
def test_anchor_positive_softmax_refuses_labels_not_in_pairs(labels):
    with pytest.raises(ValueError, match=r"exactly twice.*sampler\.m=2"):
        AnchorPositiveSoftmaxLoss()(torch.randn(len(labels), 4), torch.tensor(labels))


def test_anchor_positive_softmax_refuses_a_miner():
    embeddings, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    pairs = (torch.tensor([0]), torch.tensor([2]), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="miner=none"):
        AnchorPositiveSoftmaxLoss()(embeddings, labels, pairs)
    with pytest.raises(ValueError, match="temperature"):
        AnchorPositiveSoftmaxLoss(temperature=0.0)


def test_seed_example_trains_a_few_steps(tmp_path, data_dir):
    # The tiny data has 4 training classes: batches of 4 anchor/positive pairs.
    overrides = [
        "backbone=seed_cnn",
        "head.embedding_dim=8",
        "loss=anchor_positive_softmax",
        "sampler.m=2",
        "data.batch_size=8",
    ]
    cfg = compose_config(overrides + ["trainer.limit_val_batches=0"], tmp_path, data_dir)
    assert cfg.miner is None and cfg.loss.temperature == 0.2
    assert isinstance(instantiate_partial_with(cfg.loss, num_classes=3, embedding_size=8), AnchorPositiveSoftmaxLoss)
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = 2
    L.seed_everything(0)
    module, datamodule = build_run(cfg)
    before = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", limit_val_batches=0, use_distributed_sampler=False, **quiet_trainer_settings()
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = module.model.state_dict()
    assert all(not torch.equal(v, after[k]) for k, v in before.items())
