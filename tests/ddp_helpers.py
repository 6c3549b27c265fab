"""What the multi-process tests share: a dataset that hands each process its own, given batches, and the trainer
that runs two CPU processes on them."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from metricsearch.utils.trainer_settings import quiet_trainer_settings


class RankBatches(Dataset):
    """Item ``step`` is the batch of the calling process's rank at that step (``batches[rank][step]``); load it with
    ``DataLoader(..., batch_size=None)``."""

    def __init__(self, batches: list[list[dict[str, torch.Tensor]]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches[0])

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.batches[dist.get_rank() if dist.is_initialized() else 0][step]


def two_rank_trainer(strategy: str = "ddp_spawn", **settings: Any) -> L.Trainer:
    """A quiet two-process CPU trainer that trains on :class:`RankBatches` as given: no distributed sampler, no
    validation; ``settings`` (``max_steps``, ``callbacks``, ...) are passed on."""
    return L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        limit_val_batches=0,
        use_distributed_sampler=False,
        **settings,
        **quiet_trainer_settings(),
    )
