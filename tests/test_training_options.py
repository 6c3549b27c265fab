"""The training options of the official recipes, each checked by its effect on a real (tiny) Lightning fit.

- ``module.warmup_epochs``: the backbone (weights and BatchNorm statistics) is bit-identical through the warm-up,
  validation included, while the head and the proxies train; it trains afterwards; a resumed run freezes or
  releases it by its epoch.
- ``module.lr_multipliers`` / ``loss.lr_multiplier``: one optimizer group per part, each at lr x multiplier.
- ``scheduler.interval``: milestones counted in optimizer steps (or epochs); the lr follows the hand-computed value.
- ``module.xbm_memory_size``: the memory holds the latest embeddings; the loss is the pair loss of the batch
  against the memory, computed here by a plain loop; proxy and classification losses are refused.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from pytorch_metric_learning.losses import ContrastiveLoss
from torch import nn
from torch.utils.data import DataLoader

from metricsearch.data.dataset import IMAGE, INDEX, LABEL
from metricsearch.models.embedding_model import EmbeddingModel
from metricsearch.models.head import EmbeddingHead
from metricsearch.models.module import MetricLearningModule, XBMConfigError
from metricsearch.pipelines.train import build_run
from metricsearch.utils.config import ConfigError, validate_config
from metricsearch.utils.trainer_settings import quiet_trainer_settings
from tests.helpers import compose_config


def build(overrides: list[str], tmp_path, data_dir) -> MetricLearningModule:
    cfg = compose_config(overrides, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.module.compute_nmi = False
    validate_config(cfg)
    L.seed_everything(0)
    return build_run(cfg)


def fit(module, datamodule, max_epochs: int, callbacks=(), ckpt_path=None, **trainer_args) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1)
    trainer = L.Trainer(**{**settings, **quiet_trainer_settings(), **trainer_args}, callbacks=list(callbacks))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def snapshot(module: MetricLearningModule, prefix: str) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running statistics, batch counts) under ``prefix``, copied."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


def assert_same(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"changed during the warm-up: {changed[:5]}"


def assert_changed(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], key_part: str = "") -> None:
    keys = [k for k in before if key_part in k and after[k].is_floating_point()]
    assert keys and any(not torch.equal(after[k], before[k]) for k in keys)


class EpochSnapshots(L.Callback):
    """The module's state at the start of fit and at the end of each epoch, and the optimizer's per-epoch state."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.backbone_in_optimizer: list[bool] = []
        self.backbone_has_optimizer_state: list[bool] = []
        self.backbone_training: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.states.append(snapshot(pl_module, ""))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        bn = [m for m in pl_module.model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.backbone_training.append(any(m.training for m in bn))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states.append(snapshot(pl_module, ""))
        optimizer = trainer.optimizers[0]
        in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
        backbone = list(pl_module.model.backbone.parameters())
        self.backbone_in_optimizer.append(all(id(p) in in_groups for p in backbone))
        self.backbone_has_optimizer_state.append(any(optimizer.state.get(p) for p in backbone))


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_warmup_freezes_the_backbone_then_releases_it(tmp_path, data_dir):
    # No scheduler: the tiny config's cosine schedule spans one epoch and would end at lr 0.
    module, datamodule = build(["loss=proxy_anchor", "module.warmup_epochs=1", "scheduler=null"], tmp_path, data_dir)
    record = EpochSnapshots()
    # Validation after every batch: Lightning puts the module back in training mode after each one.
    fit(module, datamodule, max_epochs=2, callbacks=[record], val_check_interval=1)
    start, warm, released = record.states

    assert any("running_mean" in k for k in part(start, "model.backbone."))
    assert_same(part(warm, "model.backbone."), part(start, "model.backbone."))
    assert_changed(part(warm, "model.head."), part(start, "model.head."))
    assert not torch.equal(warm["loss.proxies"], start["loss.proxies"])
    # During the warm-up the backbone's BatchNorm layers are in eval mode on every batch, after validations too.
    assert record.backbone_training == [False, False, True, True]
    # Its parameters were in the optimizer throughout, with no state (no step, no decay) until released.
    assert record.backbone_in_optimizer == [True, True]
    assert record.backbone_has_optimizer_state == [False, True]

    assert_changed(part(released, "model.backbone."), part(warm, "model.backbone."), "weight")
    assert_changed(part(released, "model.backbone."), part(warm, "model.backbone."), "running_mean")
    # Released at the end of fit: the module trains as a whole again.
    assert all(p.requires_grad for p in module.parameters())


def test_resumed_run_freezes_or_releases_the_backbone_by_its_epoch(tmp_path, data_dir):
    overrides = ["loss=proxy_anchor", "module.warmup_epochs=2", "scheduler=null"]
    module, datamodule = build(overrides, tmp_path, data_dir)
    trainer = fit(module, datamodule, max_epochs=1)
    during = tmp_path / "during_warmup.ckpt"
    trainer.save_checkpoint(during)

    # Resumed at epoch 1 of a 2-epoch warm-up: still frozen.
    module, datamodule = build(overrides, tmp_path, data_dir)
    record = EpochSnapshots()
    trainer = fit(module, datamodule, max_epochs=2, callbacks=[record], ckpt_path=str(during))
    start, warm = record.states
    assert_same(part(warm, "model.backbone."), part(start, "model.backbone."))
    assert_changed(part(warm, "model.head."), part(start, "model.head."))
    after = tmp_path / "after_warmup.ckpt"
    trainer.save_checkpoint(after)

    # Resumed at epoch 2, past the warm-up: the backbone trains, its optimizer state starting then.
    module, datamodule = build(overrides, tmp_path, data_dir)
    record = EpochSnapshots()
    fit(module, datamodule, max_epochs=3, callbacks=[record], ckpt_path=str(after))
    start, released = record.states
    assert_changed(part(released, "model.backbone."), part(start, "model.backbone."), "weight")
    assert record.backbone_has_optimizer_state == [True]


def test_learning_rate_groups_carry_their_multipliers(tmp_path, data_dir):
    overrides = [
        "loss=proxy_anchor",
        "optimizer.lr=0.01",
        "module.lr_multipliers.backbone=0.1",
        "module.lr_multipliers.head=2.0",
        "scheduler=null",
    ]
    module, _ = build(overrides, tmp_path, data_dir)
    # A frozen parameter (as a frozen BatchNorm's) belongs to no group.
    frozen = next(iter(module.model.backbone.parameters()))
    frozen.requires_grad_(False)
    optimizer = module.configure_optimizers()

    expected = {"backbone": 0.01 * 0.1, "head": 0.01 * 2.0, "loss": 0.01 * 100.0}
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(expected)
    members = {
        "backbone": module.model.backbone.parameters(),
        "head": module.model.head.parameters(),
        "loss": module.loss.parameters(),
    }
    for group in optimizer.param_groups:
        assert {id(p) for p in group["params"]} == {id(p) for p in members[group["name"]] if p.requires_grad}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == {id(p) for p in module.parameters() if p.requires_grad}
    assert id(frozen) not in set(grouped)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("+module.lr_multipliers.trunk=1.0", "module.lr_multipliers.trunk is not a part"),
        ("module.lr_multipliers.head=-1", "module.lr_multipliers.head=-1 must be at least 0"),
        ("scheduler.interval=batch", "scheduler.interval=batch must be epoch, step or validation"),
        ("module.warmup_epochs=-1", "module.warmup_epochs=-1 must be at least 0"),
        ("module.xbm_memory_size=8", "module.xbm_memory_size=8 is smaller than data.batch_size=16"),
        ("trainer=ddp", "set trainer.strategy=ddp_find_unused_parameters_true"),
    ],
)
def test_impossible_training_options_are_refused_in_one_line(setting, message, tmp_path):
    overrides = [setting, "module.warmup_epochs=1"] if setting == "trainer=ddp" else [setting]
    cfg = compose_config(overrides, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


class RecordLearningRates(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.lrs.append((trainer.current_epoch, trainer.global_step, lr))


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_milestones_count_steps_or_epochs(interval, tmp_path, data_dir):
    milestones = [2, 4] if interval == "step" else [1, 2]
    overrides = [
        "scheduler=multistep",
        f"scheduler.milestones=[{milestones[0]},{milestones[1]}]",
        "scheduler.gamma=0.1",
        f"scheduler.interval={interval}",
        "optimizer.lr=0.01",
    ]
    module, datamodule = build(overrides, tmp_path, data_dir)
    record = RecordLearningRates()
    fit(module, datamodule, max_epochs=3, callbacks=[record], limit_val_batches=0)

    assert len(record.lrs) == 6  # 3 epochs x 2 batches
    for epoch, step, lr in record.lrs:
        count = step if interval == "step" else epoch
        expected = 0.01 * 0.1 ** sum(count >= m for m in milestones)
        assert lr == pytest.approx(expected, rel=1e-9), (epoch, step)


class FixedBatches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self.batches[item]


class RecordSteps(L.Callback):
    """Each training step's embeddings (from a forward hook) and returned loss."""

    def __init__(self) -> None:
        self.embeddings: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.model.register_forward_hook(lambda module, inputs, output: self.embeddings.append(output.detach()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def xbm_module(memory_size: int, start_step: int, miner=None) -> MetricLearningModule:
    torch.manual_seed(0)
    model = EmbeddingModel(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), EmbeddingHead(16, 5))
    return MetricLearningModule(
        model=model,
        loss=ContrastiveLoss(pos_margin=0.0, neg_margin=1.0),
        miner=miner,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        recall_at_k=[1],
        compute_nmi=False,
        xbm_memory_size=memory_size,
        xbm_start_step=start_step,
    )


def contrastive_against_memory(batch, labels, memory, memory_labels, own_rows, neg_margin=1.0) -> float:
    """ContrastiveLoss(pos_margin=0) of every (batch, memory) pair but each image with itself, by a plain loop.

    Positive pairs cost their distance, negative pairs ``max(0, neg_margin - distance)``; each kind is averaged
    over its pairs of nonzero cost (pytorch-metric-learning's AvgNonZeroReducer) and the two averages summed.
    """
    positives, negatives = [], []
    for i in range(len(batch)):
        for j in range(len(memory)):
            if j == own_rows[i]:
                continue
            distance = float(torch.linalg.vector_norm(batch[i] - memory[j]))
            if labels[i] == memory_labels[j]:
                positives.append(distance)
            else:
                negatives.append(max(0.0, neg_margin - distance))

    def mean_nonzero(values):
        nonzero = [v for v in values if v > 0]
        return sum(nonzero) / len(nonzero) if nonzero else 0.0

    return mean_nonzero(positives) + mean_nonzero(negatives)


def test_cross_batch_memory_holds_the_latest_embeddings_and_its_loss_is_the_pair_loss(tmp_path):
    generator = torch.Generator().manual_seed(3)
    batches = [
        {
            IMAGE: torch.randn(4, 6, generator=generator),
            LABEL: torch.tensor([0, 0, 1, 1]) + step,
            INDEX: torch.arange(4),
        }
        for step in range(5)
    ]
    module = xbm_module(memory_size=12, start_step=1)
    record = RecordSteps()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, callbacks=[record], **quiet_trainer_settings()
    )
    trainer.fit(module, train_dataloaders=DataLoader(FixedBatches(batches), batch_size=None))

    memory = module._train_parts["xbm"]
    assert len(record.embeddings) == 5
    # Step 0 trains without the memory; steps 1-4 fill its 12 rows in turn, step 4 wrapping round to rows 0-3.
    rows = {4: slice(0, 4), 2: slice(4, 8), 3: slice(8, 12)}
    for step, where in rows.items():
        torch.testing.assert_close(memory.embedding_memory[where], record.embeddings[step], rtol=0, atol=0)
        assert torch.equal(memory.label_memory[where], batches[step][LABEL])
    assert memory.has_been_filled and memory.queue_idx == 4

    # The last step's loss: its batch against the whole memory (the batch itself in rows 0-3), self-pairs left out.
    expected = contrastive_against_memory(
        record.embeddings[4], batches[4][LABEL], memory.embedding_memory, memory.label_memory, own_rows=range(4)
    )
    assert record.losses[4] == pytest.approx(expected, rel=1e-5)
    # Step 0, before the memory starts: the plain loss of the batch.
    plain = contrastive_against_memory(
        record.embeddings[0], batches[0][LABEL], record.embeddings[0], batches[0][LABEL], own_rows=range(4)
    )
    assert record.losses[0] == pytest.approx(plain, rel=1e-5)


def test_cross_batch_memory_mines_against_the_memory(tmp_path, data_dir):
    module, datamodule = build(
        ["loss=contrastive", "module.xbm_memory_size=64", "module.xbm_start_step=1"], tmp_path, data_dir
    )
    memory = module._train_parts["xbm"]
    assert memory.miner is module.miner is not None
    assert memory.embedding_size == module.model.embedding_dim
    fit(module, datamodule, max_epochs=1, limit_val_batches=0)
    # Two steps of 16: the first without the memory, the second enqueued.
    assert memory.queue_idx == 16


@pytest.mark.parametrize("loss", ["proxy_anchor", "arcface"])
def test_cross_batch_memory_refuses_proxy_and_classification_losses(loss, tmp_path, data_dir):
    with pytest.raises(XBMConfigError, match="needs a pair loss"):
        build([f"loss={loss}", "module.xbm_memory_size=64"], tmp_path, data_dir)
    assert issubclass(XBMConfigError, ConfigError)
