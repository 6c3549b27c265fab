"""Gathering a batch's rows from every process, in rank order, with gradients into this process's own rows."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_in_rank_order(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Every rank's rows of each tensor (same first dimension), rank 0's first, and the row count of each rank.

    This rank's slice is the tensor itself, so gradients flow into its own rows (and only those). Ranks may hold
    different numbers of rows: they are padded to the largest for the collective and cut back after. Without a
    process group the tensors come back as they are.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors), [len(tensors[0])]
    world_size, rank = dist.get_world_size(), dist.get_rank()
    device = tensors[0].device
    count = torch.tensor([len(tensors[0])], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    largest = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: len(tensor)] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded)
        parts = [part[:size] for part, size in zip(parts, sizes, strict=True)]
        parts[rank] = tensor
        gathered.append(torch.cat(parts))
    return gathered, sizes


def rank_offset(sizes: list[int]) -> int:
    """Where this rank's rows start in a :func:`gather_in_rank_order` result."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return sum(sizes[:rank])
