"""The options the paper recipes added: a plateau scheduler stepped after each evaluation (the official XBM code's),
hyp_metric's orthogonal head initialisation and its frozen ViT patch embedding."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from metricsearch.models.backbone import TimmBackbone
from metricsearch.models.head import EmbeddingHead
from metricsearch.pipelines.train import build_run
from metricsearch.utils.trainer_settings import quiet_trainer_settings
from tests.helpers import compose_config


def test_the_plateau_scheduler_steps_once_per_evaluation_on_the_evaluated_metric(tmp_path, data_dir):
    """threshold=10 (relative) makes every evaluation after the first "no improvement"; with patience 0 each of them
    divides the learning rate by 10: 4 evaluations (one per epoch, the sanity check not counted) leave lr x 1e-3."""
    overrides = [
        "scheduler=plateau",
        "scheduler.patience=0",
        "scheduler.threshold=10.0",
        "scheduler.cooldown=0",
        "optimizer.lr=0.01",
        "trainer.max_epochs=4",
        "module.compute_nmi=false",
    ]
    cfg = compose_config(overrides, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = 1
    L.seed_everything(0)
    module, datamodule = build_run(cfg)
    trainer = L.Trainer(
        max_epochs=4,
        limit_train_batches=1,
        num_sanity_val_steps=2,
        accelerator="cpu",
        use_distributed_sampler=False,
        **quiet_trainer_settings(),
    )
    trainer.fit(module, datamodule=datamodule)
    learning_rates = {group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups}
    assert learning_rates["backbone"] == pytest.approx(0.01 * 0.1**3)


def test_a_plateau_scheduler_without_its_metric_is_refused(tmp_path, data_dir):
    cfg = compose_config(["scheduler=plateau", "scheduler.metric=null"], tmp_path, data_dir)
    with pytest.raises(Exception, match="scheduler.metric"):
        build_run(cfg)


def test_the_orthogonal_head_has_orthonormal_rows_and_zero_bias():
    head = EmbeddingHead(in_features=384, embedding_dim=128, init="orthogonal")
    weight = head.projection.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(128), atol=1e-5, rtol=0)
    assert torch.count_nonzero(head.projection.bias) == 0


def test_the_frozen_patch_embedding_gets_no_gradient_and_the_rest_trains():
    backbone = TimmBackbone("vit_small_patch16_224", img_size=32, freeze_patch_embed=True)
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith("model.patch_embed.") for name in frozen)
    assert {"model.cls_token", "model.pos_embed"} <= {n for n, p in backbone.named_parameters() if p.requires_grad}
    backbone(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for n, p in backbone.named_parameters() if n in frozen)


def test_freezing_the_patch_embedding_of_a_cnn_is_refused():
    with pytest.raises(ValueError, match="freeze_patch_embed"):
        TimmBackbone("resnet10t", freeze_patch_embed=True)
