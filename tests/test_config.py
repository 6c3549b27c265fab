"""Every option of every config group composes and instantiates; bad options fail with Hydra's list of choices."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import wandb
from hydra.utils import instantiate
from omegaconf import open_dict

from metricsearch.utils.config import CONFIG_DIR, instantiate_partial_with, normalize_overrides, to_plain
from tests.helpers import REPO_ROOT, compose_config

GROUPS = [
    "data",
    "backbone",
    "head",
    "loss",
    "miner",
    "sampler",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "hydra",
    "debug",
    "experiment",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_required_group_exists():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no options"


def test_required_losses_and_miners_are_there():
    losses = {
        "triplet",
        "contrastive",
        "multi_similarity",
        "lifted_structure",
        "ntxent",
        "supcon",
        "circle",
        "margin",
        "proxy_nca",
        "proxy_anchor",
        "normalized_softmax",
        "arcface",
        "cosface",
        "soft_triple",
    }
    assert losses <= set(_options("loss"))
    assert {"none", "triplet_margin", "multi_similarity", "batch_hard", "pair_margin"} <= set(_options("miner"))
    assert {"m_per_class", "random"} <= set(_options("sampler"))


@pytest.mark.parametrize("option", _options("loss"))
def test_loss_composes_and_instantiates(option, tmp_path):
    cfg = compose_config([f"loss={option}"], tmp_path, tmp_path)
    loss_cfg = dict(cfg.loss)
    loss_cfg.pop("lr_multiplier", None)
    loss = instantiate_partial_with(loss_cfg, num_classes=5, embedding_size=16)
    assert isinstance(loss, torch.nn.Module)
    miner = instantiate(cfg.miner) if cfg.miner else None
    # The example's anchor/positive loss takes batches of exactly two images per class (sampler.m=2).
    per_class = 2 if option == "anchor_positive_softmax" else 4
    embeddings = torch.nn.functional.normalize(torch.randn(5 * per_class, 16, requires_grad=True), dim=1)
    labels = torch.arange(5).repeat_interleave(per_class)
    value = loss(embeddings, labels, miner(embeddings, labels) if miner else None)
    assert torch.isfinite(value)


@pytest.mark.parametrize("option", _options("miner"))
def test_miner_option(option, tmp_path):
    cfg = compose_config([f"miner={option}"], tmp_path, tmp_path)
    if option == "none":
        assert cfg.miner is None
        return
    miner = instantiate(cfg.miner)
    embeddings = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    tuples = miner(embeddings, torch.arange(4).repeat_interleave(4))
    assert len(tuples) in (3, 4)


def test_miner_null_on_the_command_line_removes_the_loss_default(tmp_path):
    assert compose_config(["loss=triplet"], tmp_path, tmp_path).miner._target_.endswith("TripletMarginMiner")
    assert compose_config(["loss=triplet", "miner=null"], tmp_path, tmp_path).miner is None
    cfg = compose_config(["loss=triplet", "miner=batch_hard"], tmp_path, tmp_path)
    assert cfg.miner._target_.endswith("BatchHardMiner")
    assert normalize_overrides(["miner=null,batch_hard", "loss.margin=null"]) == [
        "miner=none,batch_hard",
        "loss.margin=null",
    ]


@pytest.mark.parametrize("option", _options("backbone"))
def test_backbone_option(option, tmp_path):
    cfg = compose_config([f"backbone={option}"], tmp_path, tmp_path)
    with open_dict(cfg):
        cfg.backbone.pretrained = False  # no network in tests; offline weights are tested separately
    backbone = instantiate(cfg.backbone)
    size = backbone.data_config["input_size"][-1]
    features = backbone(torch.randn(2, 3, size, size))
    assert features.shape == (2, backbone.num_features)


@pytest.mark.parametrize("option", _options("head"))
def test_head_option(option, tmp_path):
    cfg = compose_config([f"head={option}"], tmp_path, tmp_path)
    head = instantiate(cfg.head)(in_features=10)
    out = head(torch.randn(4, 10))
    assert out.shape == (4, cfg.head.embedding_dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("option", _options("sampler"))
def test_sampler_option(option, tmp_path):
    cfg = compose_config([f"sampler={option}"], tmp_path, tmp_path)
    if cfg.sampler is None:
        return
    labels = np.repeat(np.arange(8), 6)
    batches = list(instantiate(cfg.sampler)(labels=labels, batch_size=16, seed=0))
    assert batches and all(len(b) == 16 for b in batches)


@pytest.mark.parametrize("option", _options("optimizer"))
def test_optimizer_and_schedulers(option, tmp_path):
    for scheduler in _options("scheduler"):
        cfg = compose_config([f"optimizer={option}", f"scheduler={scheduler}"], tmp_path, tmp_path)
        weight = torch.nn.Parameter(torch.zeros(2))
        optimizer = instantiate(cfg.optimizer)([weight])
        assert isinstance(optimizer, torch.optim.Optimizer)
        assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
        # One step on (w - 1)^2 moves the weights toward 1: the option optimizes.
        ((weight - 1.0) ** 2).sum().backward()
        optimizer.step()
        assert torch.all(weight > 0) and torch.all(weight < 1), (option, weight)
        if cfg.scheduler is None:
            continue
        # `interval` (epoch, step or validation) and a plateau scheduler's `metric` are for the module; the pipeline
        # pops them before instantiating. A plateau scheduler steps with the evaluated metric.
        settings = {k: v for k, v in to_plain(cfg.scheduler).items() if k not in ("interval", "metric")}
        lr_scheduler = instantiate(settings)(optimizer)
        plateau = cfg.scheduler.interval == "validation"
        assert isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler), scheduler
        lr_scheduler.step(0.5) if plateau else lr_scheduler.step()
        # The scheduler drives the optimizer's learning rate, and never raises it above the configured one.
        assert optimizer.param_groups[0]["lr"] == lr_scheduler.get_last_lr()[0]
        assert 0 <= optimizer.param_groups[0]["lr"] <= cfg.optimizer.lr, (option, scheduler)


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_option(option, tmp_path):
    cfg = compose_config([f"trainer={option}"], tmp_path, tmp_path)
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.devices >= 1
        return
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
    trainer = instantiate(cfg.trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("option", _options("logger"))
def test_logger_option(option, tmp_path):
    cfg = compose_config([f"logger={option}"], tmp_path, tmp_path)
    if option == "none":
        assert cfg.logger is None
        return
    loggers = [instantiate(node) for node in cfg.logger.values()]
    assert loggers
    for logger in loggers:
        logger.log_metrics({"x": 1.0}, step=0)
        logger.finalize("success")
    wandb.finish()


@pytest.mark.parametrize("group", ["callbacks", "paths", "hydra", "debug", "experiment", "data"])
def test_remaining_groups_compose(group, tmp_path):
    for option in _options(group):
        cfg = compose_config([f"{group}={option}"], tmp_path, tmp_path, tiny=group not in ("data", "experiment"))
        if group == "callbacks":
            assert all(instantiate(node) for node in cfg.callbacks.values())
        if group == "data":
            assert cfg.data._target_.startswith("metricsearch.")


def test_unknown_option_lists_the_valid_ones():
    result = subprocess.run(
        [sys.executable, "train.py", "loss=no_such_loss"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: loss=no_such_loss is not an option of conf/loss (")
    assert "proxy_anchor" in result.stderr and "triplet" in result.stderr and "Traceback" not in result.stderr
