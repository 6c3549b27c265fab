"""Every loss, with its customary miner, trains a few steps on tiny data: finite loss and changed weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from metricsearch.pipelines.train import build_run
from metricsearch.utils.config import CONFIG_DIR
from metricsearch.utils.trainer_settings import quiet_trainer_settings
from tests.helpers import compose_config

LOSSES = sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_trains_a_few_steps(loss, tmp_path, data_dir):
    overrides = [f"loss={loss}", "trainer.max_steps=3", "trainer.limit_val_batches=0"]
    if loss == "anchor_positive_softmax":
        # One anchor and one positive per class: sampler.m=2, and the tiny data's 4 training classes fill a batch of 8.
        overrides += ["sampler.m=2", "data.batch_size=8"]
    cfg = compose_config(overrides, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.limit_train_batches = 3
    L.seed_everything(0)
    module, datamodule = build_run(cfg)
    before = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        limit_val_batches=0,
        use_distributed_sampler=False,
        **quiet_trainer_settings(),
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = module.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert any(k.startswith("model.backbone.") for k in changed), "backbone weights did not change"
    assert any(k.startswith("model.head.") for k in changed)
    learnable = [n for n, p in module.loss.named_parameters() if p.requires_grad]
    if learnable:
        # Proxies / class weights are submodules: trained, in the checkpoint, and in their own param group.
        assert any(k.startswith("loss.") for k in changed), f"{loss}: loss parameters {learnable} did not change"
        groups = {group["name"]: group for group in trainer.optimizers[0].param_groups}
        assert groups.keys() == {"backbone", "head", "loss"}
        multiplier = cfg.loss.get("lr_multiplier", 1.0)
        assert groups["loss"].get("initial_lr", groups["loss"]["lr"]) == pytest.approx(
            groups["head"].get("initial_lr", groups["head"]["lr"]) * multiplier
        )
