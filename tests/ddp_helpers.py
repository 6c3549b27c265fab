"""What the multi-process tests share: a dataset that hands each process its own, given batches."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Dataset


class RankBatches(Dataset):
    """Item ``step`` is the batch of the calling process's rank at that step (``batches[rank][step]``); load it with
    ``DataLoader(..., batch_size=None)``."""

    def __init__(self, batches: list[list[dict[str, torch.Tensor]]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches[0])

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.batches[dist.get_rank() if dist.is_initialized() else 0][step]
