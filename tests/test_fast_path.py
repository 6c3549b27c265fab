"""The fast data path (uint8 cache + tensor augmentation), seeded augmentation, resume determinism, module options."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import open_dict
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from metricsearch.data.cache import IMAGES_FILE, build_image_cache
from metricsearch.data.dataset import CROP, FLIP, IMAGE, INDEX, LABEL, CachedImageDataset, ImageDataset
from metricsearch.data.gpu_augment import BatchAugment
from metricsearch.data.io import MANIFEST_NAME
from metricsearch.data.records import ImageRecords
from metricsearch.data.samplers import MPerClassBatchSampler, SeededBatchSampler
from metricsearch.data.transforms import build_eval_transform, build_train_transform
from metricsearch.pipelines.train import build_run
from metricsearch.utils.trainer_settings import quiet_trainer_settings
from tests.helpers import compose_config

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def write_images(folder, sizes, seed=0) -> list:
    """Smooth random RGB images (gradients + blobs) of the given (width, height), saved as PNG (lossless)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height) in enumerate(sizes):
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        path = folder / f"{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# The cache


def test_cache_layouts_hold_what_the_pil_path_sees(tmp_path):
    paths = write_images(tmp_path / "img", [(40, 30), (30, 50), (32, 32)])
    train = build_image_cache(paths, tmp_path / "cache", layout="train", side=24, name="train")
    images, sizes = train.open()
    assert images.shape == (3, 24, 24, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(sizes, [[40, 30], [30, 50], [32, 32]])
    # The whole image, squeezed to a square.
    squeezed = Image.open(paths[1]).convert("RGB").resize((24, 24), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(images[1], np.asarray(squeezed))

    evaluation = build_image_cache(paths, tmp_path / "cache", layout="eval", side=16, resize_size=20, name="test")
    crops, _ = evaluation.open()
    expected = build_eval_transform(16, 20, MEAN, STD)(Image.open(paths[0]).convert("RGB"))
    actual = BatchAugment(16, MEAN, STD).normalize_uint8(torch.from_numpy(np.array(crops[:1])))[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_cache_is_reused_and_rebuilt_when_files_change_or_a_build_was_cut_short(tmp_path):
    paths = write_images(tmp_path / "img", [(20, 20)] * 4)
    first = build_image_cache(paths, tmp_path / "cache", layout="train", side=8)
    stamp = (first.folder / IMAGES_FILE).stat().st_mtime_ns
    assert build_image_cache(paths, tmp_path / "cache", layout="train", side=8).folder == first.folder
    assert (first.folder / IMAGES_FILE).stat().st_mtime_ns == stamp  # reused, not rewritten
    manifest = json.loads((first.folder / MANIFEST_NAME).read_text())
    assert manifest["params"]["count"] == 4 and manifest["shape"] == [4, 8, 8, 3]

    # A build killed before its manifest was written is wiped and done again.
    (first.folder / MANIFEST_NAME).unlink()
    (first.folder / IMAGES_FILE).write_bytes(b"partial")
    again = build_image_cache(paths, tmp_path / "cache", layout="train", side=8)
    assert again.open()[0].shape == (4, 8, 8, 3)

    # Another image under the same name (another file size) makes another cache.
    write_images(tmp_path / "img", [(20, 20), (21, 20)], seed=1)
    changed = build_image_cache(paths, tmp_path / "cache", layout="train", side=8)
    assert changed.folder != first.folder


# ----------------------------------------------------------------------------------------------------------------
# Tensor augmentation


def test_identity_crop_and_flip():
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    augment = BatchAugment(8, MEAN, STD)
    crops = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = augment(images, crops, torch.tensor([False, True]))
    normalized = augment.normalize_uint8(images)
    torch.testing.assert_close(out[0], normalized[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], normalized[1].flip(-1), atol=1e-4, rtol=0)


def test_crop_matches_pil_resized_crop():
    image = Image.open(write_images_in_memory()).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image).copy())[None]
    top, left, height, width = 6, 10, 20, 16  # upsampled to 32: bilinear in both, no antialiasing involved
    crop = torch.tensor([[left / 40, top / 30, (left + width) / 40, (top + height) / 30]])
    actual = BatchAugment(32, (0, 0, 0), (1, 1, 1))(pixels, crop, torch.tensor([False]))[0]
    expected = TF.to_tensor(TF.resized_crop(image, top, left, height, width, [32, 32], antialias=True))
    assert (actual - expected).abs().mean() < 1.5 / 255


def write_images_in_memory():
    import io

    buffer = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((40, 30), Image.Resampling.BICUBIC).save(
        buffer, format="PNG"
    )
    buffer.seek(0)
    return buffer


def test_both_paths_augment_a_seeded_sample_alike(tmp_path):
    # Square images of the cache's size: the cached copy is the image itself, so the two paths differ only by
    # interpolation details; the crop and flip drawn from each seed must be the same.
    paths = write_images(tmp_path / "img", [(32, 32)] * 6)
    records = ImageRecords(paths, np.arange(6) % 2)
    pil = ImageDataset(records, build_train_transform(24, (0.3, 1.0), True, MEAN, STD))
    cached = CachedImageDataset(
        build_image_cache(paths, tmp_path / "cache", layout="train", side=32), records.labels, (0.3, 1.0)
    )
    items = [(i, 1000 + i) for i in range(6)]
    raw = cached[items]
    from_cache = BatchAugment(24, MEAN, STD)(raw[IMAGE], raw[CROP], raw[FLIP])
    from_pil = pil[items][IMAGE]
    assert from_cache.shape == from_pil.shape == (6, 3, 24, 24)
    # Normalised units: std 0.2-0.3, so 0.1 is about 6/255 of mean absolute difference.
    assert (from_cache - from_pil).abs().mean() < 0.1
    torch.testing.assert_close(pil[items][IMAGE], from_pil)  # the seed fixes the augmentation


# ----------------------------------------------------------------------------------------------------------------
# Seeds


def test_seeds_depend_on_epoch_and_position_only(tmp_path):
    labels = np.repeat(np.arange(6), 4)
    inner = MPerClassBatchSampler(labels, 8, m=4, seed=0, rank=0, world_size=1)
    sampler = SeededBatchSampler(inner, seed=5)
    first = list(sampler)
    assert first == list(SeededBatchSampler(MPerClassBatchSampler(labels, 8, m=4, seed=0, rank=0, world_size=1), 5))
    assert len({seed for batch in first for _, seed in batch}) == sum(len(b) for b in first)
    sampler.set_epoch(1)
    assert inner.epoch == 1 and list(sampler) != first

    # Workers do not matter: the same batches come out of 0 and 2 worker processes.
    paths = write_images(tmp_path / "img", [(16, 16)] * len(labels))
    dataset = ImageDataset(ImageRecords(paths, labels), build_train_transform(12, (0.3, 1.0)))
    loaders = [DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=w) for w in (0, 2)]
    for a, b in zip(*loaders, strict=True):
        torch.testing.assert_close(a[IMAGE], b[IMAGE], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# The datamodule and the module


@pytest.mark.parametrize("cache", [None, "uint8"])
def test_datamodule_batches(cache, tmp_path, data_dir):
    cfg = compose_config([f"data.cache={cache or 'null'}"], tmp_path, data_dir)
    module, datamodule = build_run(cfg)
    batch = next(iter(datamodule.train_dataloader()))
    expected_dtype = torch.float32 if cache is None else torch.uint8
    assert batch[IMAGE].dtype == expected_dtype
    batch = datamodule.on_after_batch_transfer(batch, 0)
    assert batch[IMAGE].shape == (16, 3, 32, 32) and batch[IMAGE].dtype == torch.float32
    assert set(batch) == {IMAGE, LABEL, INDEX}
    test_batch = datamodule.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0)
    pil = ImageDataset(datamodule.split.test, datamodule.eval_transform)
    expected = torch.stack([pil[int(i)][IMAGE] for i in test_batch[INDEX][:8]])
    torch.testing.assert_close(test_batch[IMAGE][:8], expected, atol=1e-5, rtol=0)


def test_channels_last_and_compile_options(tmp_path, data_dir):
    cfg = compose_config(["trainer.max_steps=2", "data.cache=uint8"], tmp_path, data_dir)
    with open_dict(cfg):
        cfg.module.channels_last = True
        cfg.module.compile = "eager"  # the compile machinery without inductor's minutes of C++ compilation
    module, datamodule = build_run(cfg)
    keys = set(module.state_dict())
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", limit_val_batches=0, use_distributed_sampler=False, accumulate_grad_batches=2,
        **quiet_trainer_settings(),
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert set(module.state_dict()) == keys  # compiled in place: checkpoints keep their keys
    weight = next(p for p in module.model.backbone.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------------
# Resume determinism


def _fit(cfg, epochs: int, folder, ckpt_path=None, disturb_rng: bool = False) -> tuple[dict, dict]:
    L.seed_everything(0)
    module, datamodule = build_run(cfg)
    if disturb_rng:
        # The global RNG (and so the DataLoader workers' seeds) now differ from the uninterrupted run's.
        torch.rand(100)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, limit_train_batches=2, limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return {k: v.clone() for k, v in module.state_dict().items()}, dict(trainer.callback_metrics)


@pytest.mark.parametrize("cache", [None, "uint8"])
def test_resumed_run_reproduces_the_uninterrupted_one(cache, tmp_path, data_dir):
    # Worker processes on the PIL path, to show their RNG does not matter; the cached path draws in the main one.
    workers = 2 if cache is None else 0
    overrides = [f"data.cache={cache or 'null'}", f"data.num_workers={workers}", "trainer.max_epochs=2"]
    cfg = compose_config(overrides, tmp_path, data_dir)
    with open_dict(cfg):
        cfg.module.compute_nmi = False
    straight, straight_metrics = _fit(cfg, 2, tmp_path / "a")
    _fit(cfg, 1, tmp_path / "b")
    resumed, resumed_metrics = _fit(cfg, 2, tmp_path / "c", tmp_path / "b" / "last.ckpt", disturb_rng=True)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    assert resumed_metrics["train/loss"] == straight_metrics["train/loss"]
