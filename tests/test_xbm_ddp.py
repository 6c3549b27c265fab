"""Cross-batch memory on two CPU processes (gloo, ``ddp_spawn``): the memory receives every rank's embeddings.

After each step, every rank's memory holds the embeddings and labels of both ranks' batches, rank 0's first, in
the same rows on both ranks (pytorch-metric-learning 2.9's distributed wrapper puts each rank's own first, so the
memories drift apart: its issue #639). The weights after two ranks' steps equal those of one process training on
the concatenated batches with a plain ``CrossBatchMemory``: the loss scaling and DDP's gradient averaging are right.

Also the backbone warm-up under DDP (``module.warmup_epochs`` with ``find_unused_parameters``): no rank updates the
frozen backbone or its BatchNorm statistics, and all do once it is released.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory, ProxyAnchorLoss
from torch import nn
from torch.utils.data import DataLoader

from metricsearch.data.dataset import IMAGE, INDEX, LABEL
from metricsearch.models.embedding_model import EmbeddingModel
from metricsearch.models.head import EmbeddingHead
from metricsearch.models.module import MetricLearningModule
from tests.ddp_helpers import RankBatches, two_rank_trainer

pytestmark = pytest.mark.ddp

STEPS = 2
BATCH = 4
MEMORY = 32


class RecordMemory(L.Callback):
    """Saves, per rank, the embeddings each step produced and the memory after each step."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.embeddings: list[torch.Tensor] = []
        self.memories: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.model.register_forward_hook(lambda module, inputs, output: self.embeddings.append(output.detach()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        memory = pl_module._train_parts["xbm"]
        self.memories.append((memory.embedding_memory.clone(), memory.label_memory.clone()))

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"embeddings": self.embeddings, "memories": self.memories}
        torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")


def xbm_module() -> MetricLearningModule:
    torch.manual_seed(0)
    model = EmbeddingModel(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), EmbeddingHead(16, 5))
    return MetricLearningModule(
        model=model,
        loss=ContrastiveLoss(pos_margin=0.0, neg_margin=1.0),
        miner=None,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        recall_at_k=[1],
        compute_nmi=False,
        xbm_memory_size=MEMORY,
    )


def test_memory_holds_both_ranks_embeddings_in_the_same_order(tmp_path):
    generator = torch.Generator().manual_seed(5)
    # Labels tell the ranks and steps apart: rank r, step s holds classes 10r + 2s and 10r + 2s + 1 (and one class,
    # 50, that both ranks hold, so some positive pairs exist only across ranks).
    batches = [
        [
            {
                IMAGE: torch.randn(BATCH, 6, generator=generator),
                LABEL: torch.tensor([10 * rank + 2 * step, 10 * rank + 2 * step + 1, 50, 50]),
                INDEX: torch.arange(BATCH),
            }
            for step in range(STEPS)
        ]
        for rank in range(2)
    ]
    module = xbm_module()
    reference = copy.deepcopy(module)
    trainer = two_rank_trainer(max_steps=STEPS, num_sanity_val_steps=0, callbacks=[RecordMemory(tmp_path)])
    trainer.fit(module, train_dataloaders=DataLoader(RankBatches(batches), batch_size=None))

    records = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for step in range(STEPS):
        rows = slice(2 * BATCH * step, 2 * BATCH * (step + 1))
        memory, labels = records[0]["memories"][step]
        expected = torch.cat([records[rank]["embeddings"][step] for rank in range(2)])
        torch.testing.assert_close(memory[rows], expected, rtol=0, atol=0)
        assert torch.equal(labels[rows], torch.cat([batches[rank][step][LABEL] for rank in range(2)]))
        assert not memory[2 * BATCH * (step + 1) :].any(), "rows past the enqueued ones are filled"
        other_memory, other_labels = records[1]["memories"][step]
        assert torch.equal(other_memory, memory) and torch.equal(other_labels, labels)

    # One process, each step's two batches concatenated (rank 0's first), a plain CrossBatchMemory.
    optimizer = reference.configure_optimizers()
    memory = CrossBatchMemory(reference.loss, embedding_size=5, memory_size=MEMORY)
    for step in range(STEPS):
        embeddings = reference.model(torch.cat([batches[rank][step][IMAGE] for rank in range(2)]))
        loss = memory(embeddings, torch.cat([batches[rank][step][LABEL] for rank in range(2)]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(memory.embedding_memory, records[0]["memories"][-1][0], atol=1e-6, rtol=1e-5)
    after = module.state_dict()
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(after[name], expected, atol=1e-6, rtol=1e-5, msg=name)


class SaveEpochState(L.Callback):
    """Each rank's module state at the end of every epoch, in a file per rank and epoch."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")


def test_warmup_under_ddp_freezes_the_backbone_on_every_rank_then_releases_it(tmp_path):
    """With DDP told of unused parameters (what validate_config asks for), the frozen backbone gets no update."""
    generator = torch.Generator().manual_seed(7)
    batches = [
        [{IMAGE: torch.randn(8, 6, generator=generator), LABEL: torch.arange(8) % 3, INDEX: torch.arange(8)}] * STEPS
        for _ in range(2)
    ]
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU())
    module = MetricLearningModule(
        model=EmbeddingModel(backbone, EmbeddingHead(16, 5)),
        loss=ProxyAnchorLoss(num_classes=3, embedding_size=5),
        miner=None,
        optimizer=functools.partial(torch.optim.AdamW, lr=0.01),
        recall_at_k=[1],
        compute_nmi=False,
        warmup_epochs=1,
    )
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = two_rank_trainer(
        "ddp_spawn_find_unused_parameters_true", max_epochs=2, callbacks=[SaveEpochState(tmp_path)]
    )
    trainer.fit(module, train_dataloaders=DataLoader(RankBatches(batches), batch_size=None))

    for rank in range(2):
        warm = torch.load(tmp_path / f"rank{rank}_epoch0.pt")
        released = torch.load(tmp_path / f"rank{rank}_epoch1.pt")
        changed = {k for k in start if not torch.equal(warm[k], start[k])}
        assert changed == {"model.head.projection.weight", "model.head.projection.bias", "loss.proxies"}, rank
        assert not torch.equal(released["model.backbone.0.weight"], warm["model.backbone.0.weight"])
        assert not torch.equal(released["model.backbone.1.running_mean"], warm["model.backbone.1.running_mean"])
