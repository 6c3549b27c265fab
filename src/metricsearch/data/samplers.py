"""Batch samplers for metric learning: every batch holds ``m`` images of each of ``batch_size / m`` classes.

Written here rather than taken from pytorch-metric-learning because its MPerClassSampler silently samples with
replacement when a class is too small and knows nothing of distributed training, where every rank must draw
its own, disjoint batches that still hold ``m`` images per class.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

# A batch of dataset indices, each paired with the seed of its augmentation.
SeededBatch = list[tuple[int, int]]


class SamplerConfigError(ValueError):
    """An impossible batch / m-per-class setting."""


def _distributed_rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MPerClassBatchSampler(Sampler[list[int]]):
    """Yields batches of ``batch_size`` indices made of ``m`` images from each of ``batch_size // m`` classes.

    Each epoch, every class is cut into groups of ``m`` shuffled images (without replacement, leftovers dropped,
    or with replacement for classes smaller than ``m`` when ``replacement`` is true); the groups are shuffled and
    packed into batches with no class twice in a batch. Under DDP each rank takes every ``world_size``-th batch
    of the same global sequence, so ranks see disjoint batches.

    Args:
        labels: class label of every dataset item.
        batch_size: images per batch on one process.
        m: images per class in a batch.
        batches_per_epoch: batches each process draws per epoch; default: the dataset size divided by the
            global batch size.
        replacement: allow repeating images of classes with fewer than ``m`` images.
        seed: base seed; the epoch number is added so every epoch differs and runs are reproducible.
    """

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        m: int = 4,
        batches_per_epoch: int | None = None,
        replacement: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        labels = np.asarray(labels)
        if m < 1:
            raise SamplerConfigError(f"sampler.m must be at least 1, got {m}")
        if batch_size % m:
            raise SamplerConfigError(
                f"data.batch_size={batch_size} is not divisible by sampler.m={m}: every batch holds m images of "
                f"each of batch_size/m classes; choose e.g. batch_size={max(m, batch_size // m * m)}"
            )
        classes, counts = np.unique(labels, return_counts=True)
        classes_per_batch = batch_size // m
        if classes_per_batch > len(classes):
            raise SamplerConfigError(
                f"data.batch_size={batch_size} with sampler.m={m} needs {classes_per_batch} classes per batch, "
                f"but the training split has only {len(classes)} classes; lower batch_size or raise m"
            )
        smallest = int(counts.min())
        if not replacement and m > smallest:
            small = classes[counts < m]
            raise SamplerConfigError(
                f"sampler.m={m} is larger than the smallest training class ({smallest} images; {len(small)} classes "
                f"have fewer than {m}, e.g. class {small[0]}), so m-per-class batches without replacement are "
                f"impossible; lower sampler.m to at most {smallest} or set sampler.replacement=true"
            )
        default_rank, default_world = _distributed_rank_and_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.labels = labels
        self.batch_size = batch_size
        self.m = m
        self.replacement = replacement
        self.seed = seed
        self.epoch = 0
        self._members = [np.flatnonzero(labels == c) for c in classes]
        if batches_per_epoch is None:
            batches_per_epoch = max(1, len(labels) // (batch_size * self.world_size))
        self.batches_per_epoch = batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start so each epoch draws new batches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _class_groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        groups = []
        for members in self._members:
            if len(members) < self.m:
                groups.append(rng.choice(members, self.m, replace=True))
                continue
            shuffled = rng.permutation(members)
            groups.extend(shuffled[i : i + self.m] for i in range(0, len(shuffled) - self.m + 1, self.m))
        return groups

    def _global_batches(self, rng: np.random.Generator) -> Iterator[list[int]]:
        classes_per_batch = self.batch_size // self.m
        while True:
            groups = self._class_groups(rng)
            order = rng.permutation(len(groups))
            pending: list[np.ndarray] = []
            for i in order:
                pending.append(groups[i])
                # NOTE: groups of one class are spread by the shuffle; a batch never holds a class twice so
                # that m stays exact. A collision defers the group to a later batch.
                batch, seen, rest = [], set(), []
                for group in pending:
                    cls = int(self.labels[group[0]])
                    if cls in seen or len(batch) == classes_per_batch:
                        rest.append(group)
                    else:
                        seen.add(cls)
                        batch.append(group)
                pending = rest
                if len(batch) == classes_per_batch:
                    yield np.concatenate(batch).tolist()
                else:
                    pending = batch + pending

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        batches = self._global_batches(rng)
        drawn = 0
        for index, batch in enumerate(batches):
            if index % self.world_size == self.rank:
                yield batch
                drawn += 1
                if drawn == self.batches_per_epoch:
                    return


class RandomBatchSampler(Sampler[list[int]]):
    """Plain shuffled batches (no class balance), disjoint across DDP ranks; the baseline sampler."""

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        default_rank, default_world = _distributed_rank_and_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.num_items = len(labels)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        if batch_size > self.num_items:
            raise SamplerConfigError(
                f"data.batch_size={batch_size} is larger than the training split ({self.num_items} images)"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_items)
        for b in range(len(self)):
            start = (b * self.world_size + self.rank) * self.batch_size
            yield order[start : start + self.batch_size].tolist()


class SeededBatchSampler(Sampler[SeededBatch]):
    """Pairs every index of another batch sampler's batches with a seed for that sample's augmentation.

    The seed is a hash of (base seed, epoch, rank, batch position, position in the batch), so the augmentation of
    every sample is fixed by where it occurs in the run: it does not depend on which DataLoader worker loads it
    or on the state of any global RNG, and a run resumed from an epoch-end checkpoint draws exactly the crops and
    flips the uninterrupted run would have. The datasets turn each seed into the generator of the transform.

    It is passed to the DataLoader as its ``sampler`` (with ``batch_size=None``), where Lightning finds it and
    calls :meth:`set_epoch` at every epoch start; Lightning does not look for ``set_epoch`` on a ``batch_sampler``.

    Args:
        batch_sampler: yields lists of dataset indices (e.g. :class:`MPerClassBatchSampler`); its ``set_epoch``
            and ``rank`` are used where it has them.
        seed: base seed (e.g. the run's ``seed``).
    """

    def __init__(self, batch_sampler: Sampler[list[int]], seed: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF  # SeedSequence takes non-negative entropy
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if callable(getattr(self.batch_sampler, "set_epoch", None)):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[SeededBatch]:
        rank = int(getattr(self.batch_sampler, "rank", 0))
        for position, batch in enumerate(self.batch_sampler):
            key = np.random.SeedSequence([self.seed, self.epoch, rank, position])
            seeds = key.generate_state(len(batch), dtype=np.uint64).tolist()
            yield list(zip((int(i) for i in batch), seeds, strict=True))
