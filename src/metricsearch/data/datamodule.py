"""The datamodule of every dataset: zero-shot split, validation classes held out of training, m-per-class batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import lightning as L
import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from metricsearch.data.dataset import ImageDataset
from metricsearch.data.records import DatasetError, DatasetSplit, ImageRecords
from metricsearch.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform


class DatasetSource(Protocol):
    """Anything that reads (or generates, or checks) a dataset on disk and returns its zero-shot split."""

    def load(self) -> DatasetSplit: ...


def split_validation_classes(records: ImageRecords, fraction: float, seed: int) -> tuple[ImageRecords, ImageRecords]:
    """Holds out ``fraction`` of the training classes (chosen by a seeded permutation) for model selection.

    Selecting checkpoints on the test classes would leak the test set into the result; these classes are
    never trained on either, so validation measures the same zero-shot generalisation.
    """
    classes = records.classes
    if fraction <= 0:
        return records, records.select(np.zeros(len(records), dtype=bool))
    num_val = max(2, round(len(classes) * fraction))
    if num_val >= len(classes) - 1:
        raise DatasetError(
            f"data.val_fraction={fraction} would hold out {num_val} of the {len(classes)} training classes, "
            "leaving too few to train on; lower data.val_fraction"
        )
    val_classes = np.random.default_rng(seed).permutation(classes)[:num_val]
    is_val = np.isin(records.labels, val_classes)
    return records.select(~is_val), records.select(is_val)


class MetricDataModule(L.LightningDataModule):
    """Builds train / val / test loaders from a :class:`DatasetSource`.

    Args:
        source: reads the dataset and returns its train / test split by class.
        batch_size: training images per batch and process.
        sampler: partial batch-sampler constructor taking ``labels`` and ``batch_size`` (e.g. m-per-class).
        eval_batch_size: images per batch when embedding val / test sets.
        num_workers: DataLoader worker processes.
        val_fraction: fraction of the training classes held out for checkpoint selection.
        image_size: training crop and evaluation centre-crop size.
        resize_size: evaluation resize of the short side before the centre crop.
        train_scale: RandomResizedCrop scale range.
        hflip: random horizontal flips in training.
        mean: normalization mean (the pipeline passes the backbone's).
        std: normalization std (the pipeline passes the backbone's).
        recall_at_k: the K of Recall@K customary for this dataset.
        seed: seed of the validation-class choice and of the sampler.
    """

    def __init__(
        self,
        source: DatasetSource,
        batch_size: int = 64,
        sampler: Callable[..., Sampler] | None = None,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        val_fraction: float = 0.2,
        image_size: int = 224,
        resize_size: int | None = 256,
        train_scale: Sequence[float] = (0.16, 1.0),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        recall_at_k: Sequence[int] = (1, 2, 4, 8),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source = source
        self.batch_size = batch_size
        self.sampler_factory = sampler
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.train_transform = build_train_transform(image_size, train_scale, hflip, mean, std)
        self.eval_transform = build_eval_transform(image_size, resize_size, mean, std)
        self.recall_at_k = list(recall_at_k)
        self.seed = seed
        self.split: DatasetSplit | None = None
        self.train_records: ImageRecords | None = None
        self.val_records: ImageRecords | None = None
        self.class_to_index: dict[int, int] = {}

    def prepare_data(self) -> None:
        # Generation / integrity checks happen in the source's load(); run once here so that under DDP the
        # first process does it before the others read.
        self.source.load()

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        split = self.source.load()
        for name, records in (("train", split.train), ("test", split.test)):
            if len(records) == 0:
                raise DatasetError(f"the {name} split of {type(self.source).__name__} is empty; check data.root")
        self.split = split
        self.train_records, self.val_records = split_validation_classes(split.train, self.val_fraction, self.seed)
        # Proxy and classification losses need contiguous class indices 0..C-1 over the training classes.
        self.class_to_index = {int(c): i for i, c in enumerate(self.train_records.classes)}

    @property
    def num_train_classes(self) -> int:
        """Number of classes trained on (training classes minus validation classes)."""
        self.setup()
        return len(self.class_to_index)

    def _eval_loader(self, records: ImageRecords) -> DataLoader:
        dataset = ImageDataset(records, self.eval_transform)
        # Under DDP each process embeds a shard; the sampler pads with repeats, which the metric drops by index.
        sampler = DistributedSampler(dataset, shuffle=False) if dist.is_available() and dist.is_initialized() else None
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        labels = np.array([self.class_to_index[int(c)] for c in self.train_records.labels], dtype=np.int64)
        dataset = ImageDataset(self.train_records, self.train_transform, labels)
        kwargs = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if self.sampler_factory is None:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, **kwargs)
        batch_sampler = self.sampler_factory(labels=labels, batch_size=self.batch_size, seed=self.seed)
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._eval_loader(self.val_records) if len(self.val_records) else []

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self.split.test)
