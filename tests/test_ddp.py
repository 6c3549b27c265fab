"""Two CPU processes (gloo, ``ddp_spawn``) train and evaluate like one process does on the same data.

- One optimizer step of two ranks, with the loss and miner gathering every rank's embeddings, equals one step of
  a single process on the concatenated batch: mining crosses ranks, DDP's gradient averaging and the proxies'
  gradient scaling are right.
- A short pipeline run on the built-in data: every rank draws its own m-per-class batches, disjoint from the
  other's; the loss sees both ranks' embeddings; the validation metrics gathered from two ranks (the
  DistributedSampler's padding duplicates dropped) equal those one process computes with the same weights.
"""

from __future__ import annotations

import copy
import functools
import json
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import open_dict
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch import nn
from torch.utils.data import DataLoader, Dataset

from metricsearch.data.dataset import IMAGE, INDEX, LABEL
from metricsearch.models.embedding_model import EmbeddingModel
from metricsearch.models.head import EmbeddingHead
from metricsearch.models.module import MetricLearningModule
from metricsearch.pipelines.train import build_run
from metricsearch.utils.trainer_settings import quiet_trainer_settings
from tests.helpers import compose_config

pytestmark = pytest.mark.ddp

SPAWN = dict(
    strategy="ddp_spawn",
    accelerator="cpu",
    devices=2,
    use_distributed_sampler=False,
    num_sanity_val_steps=0,
    **quiet_trainer_settings(),
)


class RankBatch(Dataset):
    """One fixed batch per rank: item 0 is the whole batch of the calling process's rank."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return 1

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self.batches[dist.get_rank() if dist.is_initialized() else 0]


def tiny_module() -> MetricLearningModule:
    torch.manual_seed(0)
    model = EmbeddingModel(nn.Sequential(nn.Linear(12, 16), nn.ReLU()), EmbeddingHead(16, 8))
    return MetricLearningModule(
        model=model,
        loss=ProxyAnchorLoss(num_classes=3, embedding_size=8),
        miner=MultiSimilarityMiner(epsilon=0.5),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        recall_at_k=[1],
        compute_nmi=False,
    )


def test_one_step_on_two_ranks_equals_one_process_on_the_global_batch():
    generator = torch.Generator().manual_seed(1)
    # Class 1 is on both ranks, so some positive pairs and the proxy of class 1 only exist across ranks.
    labels = [torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])]
    batches = [
        {IMAGE: torch.randn(8, 12, generator=generator), LABEL: lab, INDEX: torch.arange(8) + 8 * rank}
        for rank, lab in enumerate(labels)
    ]
    module = tiny_module()
    reference = copy.deepcopy(module)

    trainer = L.Trainer(max_steps=1, limit_val_batches=0, **SPAWN)
    trainer.fit(module, train_dataloaders=DataLoader(RankBatch(batches), batch_size=None))

    # One process, the two batches concatenated, the module's own optimizer.
    optimizer = reference.configure_optimizers()
    images = torch.cat([b[IMAGE] for b in batches])
    all_labels = torch.cat(labels)
    embeddings = reference.model(images)
    loss = reference.loss(embeddings, all_labels, reference.miner(embeddings, all_labels))
    loss.backward()
    optimizer.step()

    after = module.state_dict()
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(after[name], expected, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(after["loss.proxies"], tiny_module().state_dict()["loss.proxies"])


class RecordBatches(L.Callback):
    """Writes each rank's training batches, and the loss / miner it trains with, to a JSON file per rank."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.batches: list[dict[str, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({"index": batch[INDEX].tolist(), "label": batch[LABEL].tolist()})

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "rank": trainer.global_rank,
            "batches": self.batches,
            "loss": type(pl_module._train_parts["loss"]).__name__,
            "miner": type(pl_module._train_parts["miner"]).__name__,
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_two_processes_train_on_disjoint_batches_and_evaluate_like_one(tmp_path, data_dir):
    overrides = [
        "data.source.num_classes=16",
        "data.source.images_per_class=9",  # 3 validation classes x 9 images: an odd count, so ranks are padded
        "trainer.limit_train_batches=null",
        "sampler.batches_per_epoch=2",
    ]
    cfg = compose_config(overrides, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.module.compute_nmi = False
    L.seed_everything(0)
    module, datamodule = build_run(cfg)
    assert len(datamodule.val_records) % 2 == 1

    trainer = L.Trainer(max_epochs=1, callbacks=[RecordBatches(tmp_path)], **SPAWN)
    trainer.fit(module, datamodule=datamodule)
    two_processes = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    m = cfg.sampler.m
    for record in records:
        assert record["loss"] == DistributedLossWrapper.__name__
        assert record["miner"] == DistributedMinerWrapper.__name__
        assert len(record["batches"]) == 2
        for batch in record["batches"]:
            assert set(Counter(batch["label"]).values()) == {m}
    for step in range(2):
        rank0, rank1 = (set(record["batches"][step]["index"]) for record in records)
        assert not rank0 & rank1, "both ranks trained on the same images in one step"

    # The final weights (rank 0's, returned to this process) evaluated by one process.
    one_process = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    ).validate(module, datamodule=datamodule, verbose=False)[0]
    assert two_processes.keys() == {k for k in one_process if k.startswith("val/")}
    for key, value in two_processes.items():
        assert value == pytest.approx(one_process[key], abs=1e-6), key
    assert two_processes["val/num_queries"] == len(datamodule.val_records)
    assert np.isfinite(list(two_processes.values())).all()
