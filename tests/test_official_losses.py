"""The official-formula losses of the recipes, against plain loops of the official code's formulas.

Multi-Similarity (research-ms-loss, ``ret_benchmark/losses/multi_similarity_loss.py``) and the XBM contrastive loss
(research-xbm, ``ret_benchmark/losses/contrastive_loss.py``) are written out anchor by anchor here, as the official
files do, and compared with the vectorised losses on given embeddings; the XBM sum (batch loss + memory loss) is
checked through ``CrossBatchMemory`` as the module calls it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from metricsearch.models.losses import (
    OfficialMultiSimilarityLoss,
    OfficialXBMContrastiveLoss,
    ProjectCrossBatchMemory,
    ViewPairCrossEntropyLoss,
)


def official_multi_similarity(feats, labels, alpha=2.0, beta=40.0, base=0.5, margin=0.1) -> float:
    """The official loop: per anchor, mined positives / negatives, skipped unless both are non-empty."""
    sim = (feats @ feats.T).tolist()
    total = 0.0
    for i in range(len(labels)):
        pos_ = [s for s, y in zip(sim[i], labels, strict=True) if y == labels[i] and s < 1 - 1e-5]
        neg_ = [s for s, y in zip(sim[i], labels, strict=True) if y != labels[i]]
        if not pos_ or not neg_:
            continue
        neg = [s for s in neg_ if s + margin > min(pos_)]
        pos = [s for s in pos_ if s - margin < max(neg_)]
        if not neg or not pos:
            continue
        pos_loss = math.log(1 + sum(math.exp(-alpha * (s - base)) for s in pos)) / alpha
        neg_loss = math.log(1 + sum(math.exp(beta * (s - base)) for s in neg)) / beta
        total += pos_loss + neg_loss
    return total / len(labels)


def official_xbm_contrastive(feats, labels, ref, ref_labels, margin=0.5) -> float:
    sim = (feats @ ref.T).tolist()
    total = 0.0
    for i in range(len(labels)):
        pos = [s for s, y in zip(sim[i], ref_labels, strict=True) if y == labels[i] and s < 1 - 1e-5]
        neg = [s for s, y in zip(sim[i], ref_labels, strict=True) if y != labels[i] and s > margin]
        total += sum(1 - s for s in pos) + sum(neg)
    return total / len(labels)


def batch(seed: int, n: int = 24, dim: int = 8, classes: int = 6, spread: float = 0.6):
    """Normalised embeddings near one centre per class (so both mined sets are mixed), labels as a list."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=generator)
    feats = F.normalize(centres[labels] + spread * torch.randn(n, dim, generator=generator), dim=1)
    return feats.double(), labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spread", [0.3, 0.6, 1.5])
def test_multi_similarity_equals_the_official_loop(seed, spread):
    feats, labels = batch(seed, spread=spread)
    ours = OfficialMultiSimilarityLoss()(feats, labels)
    assert ours.item() == pytest.approx(official_multi_similarity(feats, labels.tolist()), rel=1e-9, abs=1e-12)


def test_multi_similarity_drops_copies_of_the_anchor_where_the_library_does_not():
    # Class 0: an anchor, an exact copy of it and a positive 60 degrees away; class 1 within 0.95 of the anchor. With a
    # negative that close, the library's miner mines the copy (s = 1) as a positive; the official loss never counts
    # positives with s >= 1 - 1e-5.
    rows = [[1.0, 0.0], [1.0, 0.0], [0.5, 0.866], [0.95, 0.3122], [0.95, -0.3122]]
    feats = F.normalize(torch.tensor(rows), dim=1).double()
    labels = torch.tensor([0, 0, 0, 1, 1])
    expected = official_multi_similarity(feats, labels.tolist())
    ours = OfficialMultiSimilarityLoss()(feats, labels).item()
    pairs = MultiSimilarityMiner(0.1)(feats, labels)
    library = MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.5)(feats, labels, pairs)
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert library.item() != pytest.approx(expected, rel=1e-3)


def test_multi_similarity_with_no_anchor_kept_is_zero_with_a_gradient():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0], [-0.99, 0.1]]), dim=1).requires_grad_()
    loss = OfficialMultiSimilarityLoss()(feats, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None


@pytest.mark.parametrize("seed", range(5))
def test_xbm_contrastive_equals_the_official_loop_on_the_batch(seed):
    feats, labels = batch(seed, spread=1.0)
    ours = OfficialXBMContrastiveLoss()(feats, labels)
    expected = official_xbm_contrastive(feats, labels.tolist(), feats, labels.tolist())
    assert ours.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_batch_plus_memory_loss_equals_the_official_sum(seed):
    """The module's XBM path with xbm_add_batch_loss: CrossBatchMemory's loss plus the batch loss, as the official
    trainer adds ``criterion(feats, feats)`` and ``criterion(feats, memory)`` (the memory holding the batch)."""
    loss = OfficialXBMContrastiveLoss()
    memory = ProjectCrossBatchMemory(loss, embedding_size=8, memory_size=60)
    history = []
    for step in range(4):
        feats, labels = batch(100 * seed + step, spread=1.0)
        feats, labels = feats.float(), labels + 3 * step  # classes overlap across steps
        ours = memory(feats, labels) + loss(feats, labels)
        history.append((feats, labels))
        stored = torch.cat([f for f, _ in history])[-60:], torch.cat([y for _, y in history])[-60:]
        expected = official_xbm_contrastive(feats, labels.tolist(), feats, labels.tolist()) + official_xbm_contrastive(
            feats, labels.tolist(), stored[0], stored[1].tolist()
        )
        assert ours.item() == pytest.approx(expected, rel=1e-5)


def hyp_metric_loss(z, tau):
    """hyp_metric's loop (sphere mode): z is classes x views x dim; cross-entropy per ordered pair of views, summed."""
    total = 0.0
    classes, views = z.shape[0], z.shape[1]
    for i in range(views):
        for j in range(views):
            if i == j:
                continue
            pair_sum = 0.0
            for k in range(classes):
                logits = [float(z[k, i] @ z[c, j]) / tau for c in range(classes)]
                logits += [float(z[k, i] @ z[c, i]) / tau for c in range(classes) if c != k]
                top = max(logits)
                pair_sum += -(logits[k] - top) + math.log(sum(math.exp(v - top) for v in logits))
            total += pair_sum / classes
    return total


@pytest.mark.parametrize("views", [2, 3, 9])
def test_view_pair_cross_entropy_equals_the_hyp_metric_loop(views):
    generator = torch.Generator().manual_seed(views)
    classes = 5
    z = F.normalize(torch.randn(classes, views, 6, generator=generator, dtype=torch.float64), dim=-1)
    # The batch in view-major order with the classes shuffled: each class's views keep their order (view i of a class
    # is its i-th image in the batch), which is all the official loss depends on.
    class_order = torch.randperm(classes, generator=generator)
    feats = z[class_order].transpose(0, 1).reshape(-1, 6)
    labels = class_order.repeat(views)
    ours = ViewPairCrossEntropyLoss(temperature=0.1)(feats, labels)
    assert ours.item() == pytest.approx(hyp_metric_loss(z, 0.1), rel=1e-9)


def test_view_pair_cross_entropy_with_two_views_is_twice_nt_xent():
    from pytorch_metric_learning.losses import NTXentLoss

    feats, _ = batch(7, n=12, classes=6)
    labels = torch.arange(12) % 6
    ours = ViewPairCrossEntropyLoss(temperature=0.1)(feats, labels)
    # NT-Xent adds a tiny constant inside its log for stability: equal to 1e-6.
    assert ours.item() == pytest.approx(2 * NTXentLoss(temperature=0.1)(feats, labels).item(), rel=1e-6)


def test_the_module_adds_the_batch_loss_to_the_memory_loss_as_the_official_trainer(tmp_path):
    """MetricLearningModule with xbm_add_batch_loss: after xbm_start_step, each step's loss is the official
    criterion(batch, batch) + criterion(batch, memory), the memory holding the batch (research-xbm
    trainer.py:105-115). Margin 0, so that the untrained embeddings' negatives count too."""
    import functools

    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader

    from metricsearch.data.dataset import IMAGE, INDEX, LABEL
    from metricsearch.models.embedding_model import EmbeddingModel
    from metricsearch.models.head import EmbeddingHead
    from metricsearch.models.module import MetricLearningModule
    from metricsearch.utils.trainer_settings import quiet_trainer_settings
    from tests.test_training_options import FixedBatches, RecordSteps

    generator = torch.Generator().manual_seed(5)
    batches = [
        {IMAGE: torch.randn(4, 6, generator=generator), LABEL: torch.tensor([0, 0, 1, 1]) + s, INDEX: torch.arange(4)}
        for s in range(4)
    ]
    torch.manual_seed(0)
    module = MetricLearningModule(
        model=EmbeddingModel(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), EmbeddingHead(16, 5)),
        loss=OfficialXBMContrastiveLoss(margin=0.0),
        miner=None,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        recall_at_k=[1],
        compute_nmi=False,
        xbm_memory_size=64,
        xbm_start_step=1,
        xbm_add_batch_loss=True,
    )
    record = RecordSteps()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, callbacks=[record], **quiet_trainer_settings()
    )
    trainer.fit(module, train_dataloaders=DataLoader(FixedBatches(batches), batch_size=None))
    labels = [b[LABEL].tolist() for b in batches]
    # Step 0 trains without the memory: the batch loss alone.
    first = record.embeddings[0].double()
    plain = official_xbm_contrastive(first, labels[0], first, labels[0], margin=0.0)
    assert record.losses[0] == pytest.approx(plain, rel=1e-5)
    # Step 3: the batch against itself plus against the memory of steps 1-3 (step 0 never entered it).
    last = record.embeddings[3].double()
    memory = torch.cat([record.embeddings[s] for s in (1, 2, 3)]).double()
    memory_labels = labels[1] + labels[2] + labels[3]
    expected = official_xbm_contrastive(last, labels[3], last, labels[3], margin=0.0) + official_xbm_contrastive(
        last, labels[3], memory, memory_labels, margin=0.0
    )
    assert record.losses[3] == pytest.approx(expected, rel=1e-5)
