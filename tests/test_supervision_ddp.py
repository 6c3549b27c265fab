"""Learning without labels on two CPU processes (gloo, ``ddp_spawn``): every rank's batch takes part in the loss.

Self-supervised negatives, VICReg's batch statistics and MoCo's queue span both ranks' batches, and given pairs are
shifted to the gathered rows: after two steps on two ranks the weights (and the momentum encoder, and the count of
keys queued) equal those of one process training on the two batches concatenated, which they would not if each rank
contrasted its own batch only.
"""

from __future__ import annotations

import copy
import functools

import lightning as L
import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss, NTXentLoss, VICRegLoss
from torch import nn
from torch.utils.data import DataLoader

from metricsearch.data.dataset import IMAGE, INDEX
from metricsearch.data.tuples import SAME, TUPLES
from metricsearch.data.views import VIEWS
from metricsearch.models.embedding_model import EmbeddingModel
from metricsearch.models.head import EmbeddingHead
from metricsearch.models.self_supervised import SelfSupervisedModule
from metricsearch.models.tuple_module import TupleModule
from tests.ddp_helpers import RankBatches, two_rank_trainer

pytestmark = pytest.mark.ddp

STEPS = 2
BATCH = 4


def _module(method: str) -> L.LightningModule:
    torch.manual_seed(0)
    model = EmbeddingModel(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), EmbeddingHead(16, 5))
    common = dict(model=model, miner=None, optimizer=functools.partial(torch.optim.SGD, lr=0.5), recall_at_k=[1])
    if method == "pairs":
        return TupleModule("pairs", loss=ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), compute_nmi=False, **common)
    loss = VICRegLoss() if method == "vicreg" else NTXentLoss(temperature=0.2)
    # A one-layer projector (no BatchNorm): BatchNorm's statistics are per rank under DDP, by design.
    return SelfSupervisedModule(
        method, projector_dims=[4], momentum=0.9, queue_size=32, loss=loss, compute_nmi=False, **common
    )


def _batches(method: str) -> list[list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(3)
    if method != "pairs":
        return [
            [{VIEWS: torch.randn(2, BATCH, 6, generator=generator), INDEX: torch.arange(BATCH)} for _ in range(STEPS)]
            for _ in range(2)
        ]
    # Ranks hold different numbers of images (5 and 4), so the gathered rows are padded and cut.
    tuples = [torch.tensor([[0, 1], [2, 3], [4, 0], [1, 3]]), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])]
    # Unequal shares of similar pairs: the global mean over each kind is not the mean of the ranks' means.
    same = [torch.tensor([True, True, True, False]), torch.tensor([True, False, False, False])]
    return [
        [
            {
                IMAGE: torch.randn(5 - rank, 6, generator=generator),
                INDEX: torch.arange(5 - rank),
                TUPLES: tuples[rank],
                SAME: same[rank],
            }
            for _ in range(STEPS)
        ]
        for rank in range(2)
    ]


def _concatenated(method: str, step_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The two ranks' batches of one step as one batch, rank 0's first."""
    if method != "pairs":
        return {VIEWS: torch.cat([b[VIEWS] for b in step_batches], dim=1), INDEX: torch.arange(2 * BATCH)}
    offset = len(step_batches[0][IMAGE])
    return {
        IMAGE: torch.cat([b[IMAGE] for b in step_batches]),
        TUPLES: torch.cat([step_batches[0][TUPLES], step_batches[1][TUPLES] + offset]),
        SAME: torch.cat([b[SAME] for b in step_batches]),
    }


# SimCLR runs by default (negatives from every rank); each of the others costs a two-process start too.
@pytest.mark.parametrize(
    "method", ["simclr", *(pytest.param(m, marks=pytest.mark.slow) for m in ("vicreg", "moco", "pairs"))]
)
def test_two_ranks_train_as_one_process_on_both_batches(method):
    batches = _batches(method)
    module = _module(method)
    reference = copy.deepcopy(module)
    trainer = two_rank_trainer(max_steps=STEPS, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(RankBatches(batches), batch_size=None))

    optimizer = reference.configure_optimizers()
    for step in range(STEPS):
        loss, *_ = reference.training_loss(_concatenated(method, [batches[rank][step] for rank in range(2)]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = module.state_dict()
    assert set(after) == set(reference.state_dict())
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(after[name], expected, atol=1e-6, rtol=1e-5, msg=name)
    if method == "moco":
        assert int(after["keys_seen"]) == STEPS * 2 * BATCH
