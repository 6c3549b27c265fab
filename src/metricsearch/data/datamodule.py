"""The datamodule of every dataset: the split of its protocol, validation held out of training, m-per-class batches.

Validation is held out as the protocol evaluates: under ``zero_shot`` and ``query_gallery`` whole classes (a
fraction of the training classes, or one of K class-disjoint folds), under ``closed_set`` a fraction of every
training class's images. The test loader embeds the test set, or the queries followed by the gallery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler, SequentialSampler

from metricsearch.data.cache import ImageCache, build_image_cache
from metricsearch.data.dataset import CROP, FLIP, IMAGE, CachedImageDataset, ImageDataset
from metricsearch.data.gpu_augment import BatchAugment
from metricsearch.data.records import CLOSED_SET, DatasetError, DatasetSplit, ImageRecords
from metricsearch.data.samplers import RandomBatchSampler, SeededBatchSampler
from metricsearch.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform
from metricsearch.data.tuples import (
    PAIRS,
    TRIPLETS,
    TupleDataset,
    TupleSet,
    check_tuples_in,
    dataset_root,
    read_tuples_file,
)
from metricsearch.data.views import TwoViewDataset, ViewTransform
from metricsearch.utils.config import ConfigError

log = logging.getLogger(__name__)
CACHE_MODES = (None, "uint8")
# What training reads (conf/supervision): class labels; given pairs or triplets; nothing (two views per image).
SUPERVISIONS = ("class", PAIRS, TRIPLETS, "none")


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


def split_validation_images(records: ImageRecords, fraction: float, seed: int) -> tuple[ImageRecords, ImageRecords]:
    """Holds out ``fraction`` of every training class's images for model selection (the closed-set protocol).

    Under ``closed_set`` the test images are of the training classes, so validation is too: each class keeps at
    least one training image, and a class of n >= 2 images gives ``max(1, round(fraction * n))`` of them (at most
    n - 1) to validation, chosen by a seeded permutation.

    Example:
        >>> from pathlib import Path
        >>> records = ImageRecords([Path(f"{i}.png") for i in range(8)], np.array([0, 0, 0, 0, 1, 1, 1, 1]))
        >>> train, val = split_validation_images(records, 0.25, seed=0)
        >>> np.bincount(train.labels).tolist(), np.bincount(val.labels).tolist()
        ([3, 3], [1, 1])
    """
    if fraction <= 0:
        return records, records.select(np.zeros(len(records), dtype=bool))
    if fraction >= 1:
        raise DatasetError(f"data.val_fraction={fraction} would leave no training images; set it below 1")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(records), dtype=bool)
    for label in records.classes:
        members = np.flatnonzero(records.labels == label)
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        is_val[rng.permutation(members)[:count]] = True
    return records.select(~is_val), records.select(is_val)


def check_fold_setting(num_folds: int, fold: int | None = None) -> None:
    """Raises :class:`ConfigError` unless ``num_folds`` is a whole number of at least 2 and ``fold`` one of 0..K-1."""
    if isinstance(num_folds, bool) or not isinstance(num_folds, int | np.integer) or num_folds < 2:
        raise ConfigError(
            f"data.num_folds={num_folds} cannot split classes into folds: set data.num_folds to 2 or more "
            "(e.g. 4), or to 0 to hold out data.val_fraction of the classes instead"
        )
    if fold is not None and (
        isinstance(fold, bool) or not isinstance(fold, int | np.integer) or not 0 <= fold < num_folds
    ):
        raise ConfigError(f"data.fold={fold} is not a fold of data.num_folds={num_folds}; set 0..{num_folds - 1}")


def class_folds(classes: Sequence[int] | np.ndarray, num_folds: int, seed: int = 0) -> list[np.ndarray]:
    """Splits classes into ``num_folds`` class-disjoint folds of sizes differing by at most one.

    The folds of cross-validation over classes ("A Metric Learning Reality Check", Musgrave et al. 2020): each
    fold in turn is validated on while the others are trained on. They depend only on the set of classes and
    ``seed`` (not on their order, nor on a run's seed), so every run of a comparison sees the same folds.

    Args:
        classes: The training classes (duplicates are ignored).
        num_folds: K, at least 2 and at most the number of classes.
        seed: Seed of the permutation that deals the classes into folds.

    Returns:
        K sorted arrays of class ids, disjoint, together holding every class.

    Raises:
        ConfigError: K is below 2 or larger than the number of classes.

    Example:
        >>> [fold.tolist() for fold in class_folds(range(5), 2, seed=0)]
        [[2, 3, 4], [0, 1]]
    """
    classes = np.unique(np.asarray(classes))
    check_fold_setting(num_folds)
    if num_folds > len(classes):
        raise ConfigError(
            f"data.num_folds={num_folds} is larger than the {len(classes)} training classes (each fold needs at "
            f"least one); set data.num_folds to at most {len(classes)}"
        )
    permuted = np.random.default_rng(seed).permutation(classes)
    return [np.sort(fold) for fold in np.array_split(permuted, num_folds)]


def split_fold_classes(
    records: ImageRecords, num_folds: int, fold: int, seed: int = 0
) -> tuple[ImageRecords, ImageRecords]:
    """Validates on the classes of fold ``fold`` of :func:`class_folds` and trains on those of the other folds.

    Raises:
        ConfigError: ``fold`` is not one of 0..K-1, or K cannot split these classes (see :func:`class_folds`).
    """
    check_fold_setting(num_folds, fold)
    folds = class_folds(records.classes, num_folds, seed)
    is_val = np.isin(records.labels, folds[fold])
    return records.select(~is_val), records.select(is_val)


class MetricDataModule(L.LightningDataModule):
    """Builds train / val / test loaders from a :class:`DatasetSource`.

    Args:
        source: reads the dataset and returns its train / test split by class.
        batch_size: training images per batch and process.
        sampler: partial batch-sampler constructor taking ``labels`` and ``batch_size`` (e.g. m-per-class).
        eval_batch_size: images per batch when embedding val / test sets.
        num_workers: DataLoader worker processes.
        val_fraction: fraction of the training classes held out for checkpoint selection (when ``num_folds`` is 0);
            under the ``closed_set`` protocol, the fraction of every class's training images.
        num_folds: 0 to hold out ``val_fraction`` of the training classes; K >= 2 to split the training classes into
            K class-disjoint folds (:func:`class_folds`), validate on fold ``fold`` and train on the other K - 1.
            The test classes are the same either way.
        fold: which of the ``num_folds`` folds is validated on (0..K-1).
        fold_seed: seed of the folds, separate from ``seed`` so that runs of different seeds share the same folds.
        image_size: training crop and evaluation centre-crop size.
        resize_size: evaluation resize of the short side before the centre crop.
        train_scale: RandomResizedCrop scale range.
        hflip: random horizontal flips in training.
        mean: normalization mean (the pipeline passes the backbone's), in the network's channel order.
        std: normalization std (the pipeline passes the backbone's), in the network's channel order.
        channel_order: ``RGB``, or ``BGR`` for networks that take the channels reversed (the pipeline passes the
            backbone's).
        recall_at_k: the K of Recall@K customary for this dataset.
        seed: seed of the validation-class choice, of the sampler and of every sample's augmentation.
        cache: None for the PIL path (decode + augment every image in DataLoader workers); ``"uint8"`` for the fast
            path: images decoded and resized once into memory-mapped uint8 caches (:mod:`metricsearch.data.cache`),
            training crops, flips and normalization done on the batch tensor on the training device
            (:mod:`metricsearch.data.gpu_augment`), evaluation reading the stored centre crops.
        cache_dir: where the caches live; default: ``cache`` inside the source's ``root``.
        pin_memory: page-locked batches for faster host-to-GPU copies; default: when CUDA is available.
        validate_on_test: evaluate the TEST classes after every epoch instead of held-out training classes
            (``selection=test_best``, the papers' optimistic protocol; set by the pipeline, not by hand).
        supervision: what training reads (``conf/supervision``). ``class``: labelled images in batches of the
            sampler. ``pairs`` / ``triplets``: only the tuples of ``pairs_file`` / ``triplets_file``, batches of
            ``batch_size // 2`` pairs or ``batch_size // 3`` triplets, and no label; validation is on the training
            classes no tuple names (``closed_set``: the training images no tuple names). ``none``: every training
            image as two ``views``, no label.
        pairs_file: the pairs CSV of ``supervision=pairs`` (see :mod:`metricsearch.data.tuples`).
        triplets_file: the triplets CSV of ``supervision=triplets``.
        views: the :class:`~metricsearch.data.views.ViewTransform` options of ``supervision=none``.
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
        channel_order: str = "RGB",
        recall_at_k: Sequence[int] = (1, 2, 4, 8),
        seed: int = 0,
        cache: str | None = None,
        cache_dir: str | None = None,
        pin_memory: bool | None = None,
        validate_on_test: bool = False,
        num_folds: int = 0,
        fold: int = 0,
        fold_seed: int = 0,
        supervision: str = "class",
        pairs_file: str | None = None,
        triplets_file: str | None = None,
        views: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if supervision not in SUPERVISIONS:
            raise ConfigError(f"supervision={supervision} is not one of {', '.join(SUPERVISIONS)}")
        if supervision != "class" and cache is not None:
            raise ConfigError(
                f"data.cache={cache} serves labelled images only; set data.cache=null with supervision={supervision}"
            )
        if num_folds != 0:
            # Checked before any data is read; the number of classes is checked once they are known.
            check_fold_setting(num_folds, fold)
        if cache not in CACHE_MODES:
            raise ValueError(f"data.cache={cache!r} is not one of {CACHE_MODES} (null: decode with PIL every time)")
        self.source = source
        self.batch_size = batch_size
        self.sampler_factory = sampler
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.resize_size = resize_size
        self.train_scale = tuple(train_scale)
        self.hflip = hflip
        self.train_transform = build_train_transform(image_size, train_scale, hflip, mean, std, channel_order)
        self.eval_transform = build_eval_transform(image_size, resize_size, mean, std, channel_order)
        self.recall_at_k = list(recall_at_k)
        self.seed = seed
        self.cache = cache
        self.cache_dir = cache_dir
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.validate_on_test = validate_on_test
        self.num_folds = num_folds
        self.fold = fold
        self.fold_seed = fold_seed
        self.augment = BatchAugment(image_size, mean, std, channel_order)
        self.split: DatasetSplit | None = None
        self.train_records: ImageRecords | None = None
        self.val_records: ImageRecords | None = None
        self.class_to_index: dict[int, int] = {}
        self.caches: dict[str, ImageCache] = {}
        self.supervision = supervision
        self.views = ViewTransform(image_size, **(views or {}), mean=mean, std=std, channel_order=channel_order)
        # Read and checked now, before any data is generated or any model built: a broken file fails in a second.
        self.tuples: TupleSet | None = None
        if supervision in (PAIRS, TRIPLETS):
            file = pairs_file if supervision == PAIRS else triplets_file
            if not file:
                raise ConfigError(
                    f"supervision={supervision} needs data.{supervision}_file=PATH, a CSV of {supervision} (paths "
                    f"relative to the data root); scripts/make_tuples.py draws one from a labelled dataset"
                )
            self.tuples = read_tuples_file(file, supervision, dataset_root(source))

    def prepare_data(self) -> None:
        # Generation / integrity checks happen in the source's load(); run once here so that under DDP the
        # first process does it before the others read. The caches are built here too for the same reason
        # (the other processes find them finished; concurrent builders would be serialized anyway).
        self.source.load()
        if self.cache is not None:
            self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self._load_split()
        if stage == "fit":
            self._require_training_images()

    def _require_training_images(self) -> None:
        # An evaluation-only dataset (a folder of query/ + gallery/, or every class of root/<class>/ evaluated) has
        # no training images: fine for trainer.test, refused for training.
        if len(self.split.train) == 0:
            raise DatasetError(
                f"the train split of {type(self.source).__name__} is empty; check data.root (a folder with only "
                "query/ and gallery/ can be evaluated with scripts/evaluate.py, not trained on)"
            )

    def _load_split(self) -> None:
        split = self.source.load()
        for name, records in (("test", split.test), ("gallery", split.gallery)):
            if records is not None and len(records) == 0:
                raise DatasetError(f"the {name} split of {type(self.source).__name__} is empty; check data.root")
        self.split = split
        if len(split.train) == 0:
            # Nothing to hold validation classes or images out of: an evaluation-only dataset.
            self.train_records, self.val_records = split.train, split.train
        elif split.protocol == CLOSED_SET:
            if self.num_folds:
                raise ConfigError(
                    f"data.num_folds={self.num_folds}: class folds need unseen validation classes, but this dataset "
                    "uses the closed_set protocol (its test classes are the training classes); set data.num_folds=0"
                )
            if self.tuples is not None:
                self.train_records, self.val_records = self._split_by_tuples(split.train, closed_set=True)
            else:
                # The validation images are held out of every training class, as the test images are of the same
                # ones.
                self.train_records, self.val_records = split_validation_images(
                    split.train, self.val_fraction, self.seed
                )
        elif self.tuples is not None:
            self.train_records, self.val_records = self._split_by_tuples(split.train, closed_set=False)
        elif self.num_folds:
            self.train_records, self.val_records = split_fold_classes(
                split.train, self.num_folds, self.fold, self.fold_seed
            )
        else:
            self.train_records, self.val_records = split_validation_classes(split.train, self.val_fraction, self.seed)
        # Proxy and classification losses need contiguous class indices 0..C-1 over the training classes.
        self.class_to_index = {int(c): i for i, c in enumerate(self.train_records.classes)}
        if self.cache is not None:
            self._build_caches()

    def _split_by_tuples(self, records: ImageRecords, closed_set: bool) -> tuple[ImageRecords, ImageRecords]:
        """Trains on the images the tuples name; validates on the training classes of which they name none, or
        under ``closed_set`` (the test images are of the training classes) on the training images they do not name.

        The labels decide only which images are evaluated for checkpoint selection; training never reads them.
        """
        check_tuples_in(self.tuples, records.paths)
        named = {path for path in self.tuples.paths}
        is_named = np.array([Path(p).resolve() in named for p in records.paths])
        # Closed set: the images no tuple names; otherwise the classes of which no tuple names an image.
        unnamed = ~is_named if closed_set else ~np.isin(records.labels, np.unique(records.labels[is_named]))
        if self.val_fraction <= 0 or len(np.unique(records.labels[unnamed])) < 2:
            unnamed[:] = False
        return records.select(is_named), records.select(unnamed)

    def _cache_root(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        return Path(getattr(self.source, "root", "data")).expanduser() / "cache"

    def _build_caches(self) -> None:
        """One uint8 cache per split: the training images whole, validation and test as evaluation crops."""
        root = self._cache_root()
        # NOTE: the training copy keeps at least the evaluation resolution, so crops near full scale are not
        # upsampled from a smaller copy than the PIL path starts from.
        train_side = max(self.resize_size or self.image_size, self.image_size)
        self.caches["train"] = build_image_cache(
            self.train_records.paths, root, layout="train", side=train_side, name="train"
        )
        for name, records in (("val", self.val_records), ("test", self.split.evaluation)):
            if len(records):
                self.caches[name] = build_image_cache(
                    records.paths, root, layout="eval", side=self.image_size, resize_size=self.resize_size, name=name
                )
        gigabytes = sum(cache.nbytes for cache in self.caches.values()) / 1e9
        log.info("Fast data path: %.2f GB of uint8 caches in %s", gigabytes, root)

    @property
    def test_num_queries(self) -> int | None:
        """How many of the test loader's first images are queries searched in the rest (the gallery), or None when
        the test set is searched against itself."""
        self.setup()
        return self.split.num_queries

    @property
    def val_num_queries(self) -> int | None:
        """Like :attr:`test_num_queries` for the validation loader (the test set's under ``validate_on_test``)."""
        return self.test_num_queries if self.validate_on_test else None

    @property
    def num_train_classes(self) -> int:
        """Number of classes trained on (training classes minus validation classes)."""
        self.setup("fit")
        return len(self.class_to_index)

    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory)

    def _eval_loader(self, records: ImageRecords, name: str) -> DataLoader:
        distributed = dist.is_available() and dist.is_initialized()
        if self.cache is None:
            dataset = ImageDataset(records, self.eval_transform)
            # Under DDP each process embeds a shard; the sampler pads with repeats, which the metric drops by index.
            sampler = DistributedSampler(dataset, shuffle=False) if distributed else None
            return DataLoader(
                dataset, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False, **self._loader_kwargs()
            )
        dataset = CachedImageDataset(self.caches[name], records.labels)
        order = DistributedSampler(dataset, shuffle=False) if distributed else SequentialSampler(dataset)
        # Whole batches are gathered from the memory map at once: the dataset takes the batch's index list.
        batches = BatchSampler(order, self.eval_batch_size, drop_last=False)
        return DataLoader(dataset, sampler=batches, batch_size=None, **self._loader_kwargs())

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.supervision != "class":
            return self._unlabelled_train_loader()
        labels = np.array([self.class_to_index[int(c)] for c in self.train_records.labels], dtype=np.int64)
        if self.sampler_factory is None:
            batch_sampler = RandomBatchSampler(labels, batch_size=self.batch_size, seed=self.seed)
        else:
            batch_sampler = self.sampler_factory(labels=labels, batch_size=self.batch_size, seed=self.seed)
        if self.cache is None:
            dataset = ImageDataset(self.train_records, self.train_transform, labels)
        else:
            dataset = CachedImageDataset(self.caches["train"], labels, scale=self.train_scale, hflip=self.hflip)
        # NOTE: the batch sampler goes in as the DataLoader's sampler, with batch_size=None, so each dataset item is a
        # whole seeded batch: Lightning then calls set_epoch on it (it never does on a batch_sampler), and every
        # sample's augmentation follows from its seed rather than from a worker's RNG.
        sampler = SeededBatchSampler(batch_sampler, seed=self.seed)
        # NOTE: Lightning draws the first batch of a fit (to look ahead) before its first set_epoch call. After a
        # resume that batch would come from epoch 0; start at the restored epoch instead.
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return DataLoader(dataset, sampler=sampler, batch_size=None, **self._loader_kwargs())

    def _unlabelled_train_loader(self) -> DataLoader:
        """Batches of tuples (``pairs`` / ``triplets``) or of two-view images (``none``), without labels."""
        if self.tuples is not None:
            dataset = TupleDataset(self.tuples, self.train_transform)
            batch_size = max(1, self.batch_size // self.tuples.arity)
            if len(dataset) < batch_size:
                kind = self.tuples.kind
                raise DatasetError(
                    f"data.{kind}_file={self.tuples.file} holds {len(dataset)} {kind}, fewer than one batch of "
                    f"{batch_size} (data.batch_size={self.batch_size} // {self.tuples.arity}); add {kind} or lower "
                    "data.batch_size"
                )
        else:
            dataset = TwoViewDataset(self.train_records.paths, self.views)
            batch_size = self.batch_size
        # NOTE: plain shuffled batches over the items; RandomBatchSampler reads only how many there are.
        batch_sampler = RandomBatchSampler(np.zeros(len(dataset), dtype=np.int64), batch_size, seed=self.seed)
        sampler = SeededBatchSampler(batch_sampler, seed=self.seed)
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return DataLoader(dataset, sampler=sampler, batch_size=None, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.validate_on_test:
            return self._eval_loader(self.split.evaluation, "test")
        return self._eval_loader(self.val_records, "val") if len(self.val_records) else []

    def test_dataloader(self) -> DataLoader:
        """The test set, or under ``query_gallery`` the queries, then the gallery (see :attr:`test_num_queries`)."""
        self.setup()
        return self._eval_loader(self.split.evaluation, "test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Finishes cached (uint8) batches on the device they were moved to: augments training batches (crop,
        resize, flip, normalize), normalises evaluation batches. PIL-path batches pass through unchanged."""
        if not isinstance(batch, dict) or IMAGE not in batch or batch[IMAGE].dtype != torch.uint8:
            return batch
        images = batch[IMAGE]
        if CROP in batch:
            images = self.augment(images, batch.pop(CROP), batch.pop(FLIP))
        else:
            images = self.augment.normalize_uint8(images)
        return {**batch, IMAGE: images}
