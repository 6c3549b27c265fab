"""Training benchmarks: images/s of the PIL and the uint8-cache data paths, and Lightning's overhead over a plain loop.

All of them train the project's own parts (timm backbone + embedding head, a pytorch-metric-learning loss and
miner, :class:`MetricLearningModule`, :class:`MetricDataModule`) on the built-in synthetic data, so the numbers
are those of ``python train.py``, not of a stripped-down copy.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import TripletMarginMiner
from torch import nn
from torch.utils.data import DataLoader, Dataset

from metricsearch.data.datamodule import MetricDataModule
from metricsearch.data.dataset import IMAGE, INDEX, LABEL
from metricsearch.data.gpu_augment import BatchAugment
from metricsearch.data.samplers import MPerClassBatchSampler
from metricsearch.data.synthetic import SyntheticSource
from metricsearch.models.backbone import TimmBackbone
from metricsearch.models.embedding_model import EmbeddingModel
from metricsearch.models.head import EmbeddingHead
from metricsearch.models.module import MetricLearningModule
from metricsearch.utils.trainer_settings import quiet_trainer_settings


@dataclass(frozen=True)
class TrainSetting:
    """One training configuration to measure."""

    backbone: str = "resnet10t"
    image_size: int = 64
    batch_size: int = 64
    precision: str = "32-true"
    channels_last: bool = False
    compile: bool = False
    embedding_dim: int = 128
    m: int = 4
    warmup_steps: int = 3
    steps: int = 15
    num_workers: int = 2
    accelerator: str = "cpu"
    # torch's intra-op threads in the training process (None: torch's default, one per core). On a shared machine
    # one thread gives stable numbers: threads that wait for each other at every operation stall whenever another
    # process takes a core.
    threads: int | None = None
    # The synthetic data the throughput runs read: classes x images, stored at this size.
    num_classes: int = 200
    images_per_class: int = 20
    source_size: int = 64

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.accelerator in ("gpu", "cuda") else "cpu")


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Runs the body with ``count`` intra-op threads (unchanged for None), restoring the previous number."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_parts(setting: TrainSetting, seed: int = 0) -> tuple[EmbeddingModel, nn.Module, nn.Module]:
    """The model, loss and miner of the default run (triplet loss, semi-hard miner), freshly initialised."""
    torch.manual_seed(seed)
    backbone = TimmBackbone(setting.backbone, pretrained=False)
    model = EmbeddingModel(backbone, EmbeddingHead(backbone.num_features, setting.embedding_dim))
    return model, TripletMarginLoss(margin=0.2), TripletMarginMiner(margin=0.2, type_of_triplets="semihard")


def build_module(setting: TrainSetting, parts: tuple[EmbeddingModel, nn.Module, nn.Module]) -> MetricLearningModule:
    model, loss, miner = parts
    return MetricLearningModule(
        model=model,
        loss=loss,
        miner=miner,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
        recall_at_k=[1],
        compute_nmi=False,
        channels_last=setting.channels_last,
        compile=setting.compile,
    )


def build_trainer(setting: TrainSetting, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator=setting.accelerator,
        devices=1,
        precision=setting.precision,
        max_steps=setting.warmup_steps + setting.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=callbacks,
        **quiet_trainer_settings(),
    )


@dataclass
class StepTimes:
    """Wall-clock and process CPU time at the end of every step.

    CPU time (all threads of this process) is the work done, whatever else runs on the machine; wall time is what
    a user waits, and on a shared machine it also measures the other users.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def mark(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())


class StepTimer(L.Callback):
    """Times the end of every training step (synchronising CUDA only where the measurement starts and ends, so
    that the host can run ahead of the device as in a real run)."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.times = StepTimes()

    @property
    def ends(self) -> list[float]:
        return self.times.wall

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = len(self.times.wall) + 1
        if torch.cuda.is_available() and step in (self.warmup_steps, self.total_steps):
            torch.cuda.synchronize()
        self.times.mark()


def throughput(ends: list[float], warmup_steps: int, batch_size: int) -> float:
    """Images per second from the end of the warm-up to the end of the last step."""
    measured = len(ends) - warmup_steps
    return measured * batch_size / (ends[-1] - ends[warmup_steps - 1])


def step_durations(ends: list[float], warmup_steps: int) -> list[float]:
    return list(np.diff(ends[warmup_steps - 1 :]))


# ------------------------------------------------------------------------------------------------------------------
# Images/s with each data path


def measure_data_path(setting: TrainSetting, data_root: Path, cache: str | None) -> dict[str, Any]:
    """Trains for ``warmup + steps`` steps reading the synthetic data through one data path; returns images/s."""
    source = SyntheticSource(
        root=data_root,
        num_classes=setting.num_classes,
        images_per_class=setting.images_per_class,
        image_size=setting.source_size,
    )
    total = setting.warmup_steps + setting.steps
    datamodule = MetricDataModule(
        source,
        batch_size=setting.batch_size,
        sampler=functools.partial(MPerClassBatchSampler, m=setting.m, batches_per_epoch=total),
        num_workers=setting.num_workers,
        val_fraction=0.0,
        image_size=setting.image_size,
        resize_size=max(setting.image_size, setting.source_size),
        train_scale=(0.16, 1.0),
        cache=cache,
        cache_dir=str(data_root / "cache"),
    )
    prepared = time.perf_counter()
    datamodule.prepare_data()  # generation and, for the fast path, the one-off cache build: not measured
    prepare_seconds = time.perf_counter() - prepared
    module = build_module(setting, build_parts(setting))
    timer = StepTimer(setting.warmup_steps, total)
    with torch_threads(setting.threads):
        build_trainer(setting, [timer]).fit(module, datamodule=datamodule)
    return {
        "images_per_s": throughput(timer.ends, setting.warmup_steps, setting.batch_size),
        "steps": len(timer.ends) - setting.warmup_steps,
        "prepare_seconds": prepare_seconds,
    }


# ------------------------------------------------------------------------------------------------------------------
# Plain loop vs Lightning on in-memory batches


class InMemoryBatches(Dataset):
    """A fixed list of ready batches (no decoding), served as they are: item i is batch i."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self.batches[item]


def make_batches(setting: TrainSetting, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random normalised images with m-per-class labels, the shape of real training batches."""
    generator = torch.Generator().manual_seed(seed)
    classes = setting.batch_size // setting.m
    batches = []
    for i in range(count):
        labels = (torch.randperm(100, generator=generator)[:classes] + 100 * i).repeat_interleave(setting.m)
        images = torch.randn(setting.batch_size, 3, setting.image_size, setting.image_size, generator=generator)
        batches.append({IMAGE: images, LABEL: labels, INDEX: torch.arange(setting.batch_size)})
    return batches


def _autocast(setting: TrainSetting) -> contextlib.AbstractContextManager:
    if setting.precision.startswith("bf16"):
        return torch.autocast(setting.device.type, dtype=torch.bfloat16)
    if setting.precision.startswith("16"):
        return torch.autocast(setting.device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def plain_loop(setting: TrainSetting, parts, loader: DataLoader, augment: Callable | None = None) -> StepTimes:
    """The hand-written PyTorch loop: forward, mine, loss, backward, step. Returns each step's end time."""
    model, loss_fn, miner = parts
    device = setting.device
    model.to(device).train()
    loss_fn.to(device)
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
    if setting.compile:
        model.compile()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # NOTE: a loss scaler only where fp16 needs one; the float32 loop is the bare minimum anyone would write.
    scaler = torch.amp.GradScaler(setting.device.type) if setting.precision.startswith("16") else None
    times = StepTimes()
    for step, batch in enumerate(_cycle(loader)):
        if step == setting.warmup_steps + setting.steps:
            break
        images = batch[IMAGE].to(device, non_blocking=True)
        labels = batch[LABEL].to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        if setting.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(setting):
            embeddings = model(images)
            loss = loss_fn(embeddings, labels, miner(embeddings, labels))
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if device.type == "cuda" and step + 1 in (setting.warmup_steps, setting.warmup_steps + setting.steps):
            torch.cuda.synchronize()
        times.mark()
    return times


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def lightning_loop(setting: TrainSetting, parts, loader: DataLoader) -> StepTimes:
    """The same training through :class:`MetricLearningModule` and ``Trainer.fit``. Returns each step's end time."""
    module = build_module(setting, parts)
    timer = StepTimer(setting.warmup_steps, setting.warmup_steps + setting.steps)
    build_trainer(setting, [timer]).fit(module, train_dataloaders=loader)
    return timer.times


def measure_lightning_overhead(setting: TrainSetting, rounds: int = 4, log=print) -> dict[str, Any]:
    """Step time of Lightning over that of the plain loop, on the same batches, in ``rounds`` back-to-back pairs.

    Each round runs both loops one after the other (in alternating order, so that a load trend does not favour
    one) and takes the ratio of their median step times; the result is the median of the rounds' ratios. On a
    shared machine the load changes from minute to minute, but rarely within one pair of runs.

    Both the process CPU time and the wall-clock time of each step are measured. The CPU-time ratio is the
    framework's extra work and moves least with other processes, so it is the headline number; the wall-clock
    ratio is what a user waits, and the two agree on an idle machine. Run it with ``setting.threads=1``: threads
    that wait for each other at the end of every parallel operation burn CPU time, and more of it the busier the
    machine, which would make CPU time a measure of the load again.
    """
    with torch_threads(setting.threads):
        return {**_measure_lightning_overhead(setting, rounds, log), "threads": torch.get_num_threads()}


def _measure_lightning_overhead(setting: TrainSetting, rounds: int, log) -> dict[str, Any]:
    total = setting.warmup_steps + setting.steps
    loader = DataLoader(InMemoryBatches(make_batches(setting, total)), batch_size=None, shuffle=False)
    initial = build_parts(setting)
    loops = {"plain": plain_loop, "lightning": lightning_loop}
    per_round: list[dict[str, dict[str, float]]] = []
    for round_index in range(rounds):
        order = ("plain", "lightning") if round_index % 2 == 0 else ("lightning", "plain")
        medians: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
        for name in order:
            times = loops[name](setting, copy.deepcopy(initial), loader)
            for clock in ("wall", "cpu"):
                medians[clock][name] = statistics.median(step_durations(getattr(times, clock), setting.warmup_steps))
        per_round.append(medians)
        log(f"  round {round_index + 1}: plain {medians['wall']['plain'] * 1000:.0f} ms, lightning "
            f"{medians['wall']['lightning'] * 1000:.0f} ms per step (CPU time {medians['cpu']['plain'] * 1000:.0f} "
            f"/ {medians['cpu']['lightning'] * 1000:.0f} ms)")  # fmt: skip

    def ratio(clock: str) -> float:
        return statistics.median(r[clock]["lightning"] / r[clock]["plain"] for r in per_round)

    def median_ms(clock: str, name: str) -> float:
        return statistics.median(r[clock][name] for r in per_round) * 1000

    return {
        "ratio": ratio("cpu"),
        "ratio_wall": ratio("wall"),
        "plain_step_ms": median_ms("wall", "plain"),
        "lightning_step_ms": median_ms("wall", "lightning"),
        "plain_step_cpu_ms": median_ms("cpu", "plain"),
        "lightning_step_cpu_ms": median_ms("cpu", "lightning"),
        "rounds": [{clock: {k: v * 1000 for k, v in by.items()} for clock, by in r.items()} for r in per_round],
        "images_per_s_plain": setting.batch_size * 1000 / median_ms("wall", "plain"),
        "images_per_s_lightning": setting.batch_size * 1000 / median_ms("wall", "lightning"),
    }


def measure_model_only(setting: TrainSetting, count: int = 4) -> dict[str, Any]:
    """The model alone: the plain loop on a few uint8 batches already on the device, augmented there.

    The upper bound of any data path: no loading at all, only what the GPU must do anyway.
    """
    device = setting.device
    generator = torch.Generator().manual_seed(0)
    side = setting.image_size
    batches = []
    for batch in make_batches(setting, count):
        pixels = torch.randint(0, 256, (setting.batch_size, side, side, 3), dtype=torch.uint8, generator=generator)
        batches.append({IMAGE: pixels.to(device), LABEL: batch[LABEL].to(device)})
    augment = BatchAugment(side, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).to(device)
    with torch_threads(setting.threads):
        times = plain_loop(setting, build_parts(setting), InMemoryBatchLoader(batches), augment.normalize_uint8)
    return {"images_per_s": throughput(times.wall, setting.warmup_steps, setting.batch_size)}


class InMemoryBatchLoader:
    """Iterates over batches already on the device (a DataLoader would move them back through shared memory)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)


# ------------------------------------------------------------------------------------------------------------------
# Whole SOP-size test evaluation on a GPU: embedding, search, metrics


def measure_gpu_evaluation(
    num_items: int,
    labels: np.ndarray,
    backbone: str = "resnet50",
    image_size: int = 224,
    batch_size: int = 1024,
    embedding_dim: int = 512,
    device: str = "cuda",
    compile: bool = True,
    log=print,
) -> dict[str, Any]:
    """Embeds ``num_items`` uint8 images held in pinned host memory (what the eval cache gives once it is in the page
    cache), gathers the embeddings and computes Recall@1/10/100/1000, R-Precision and MAP@R on the GPU.

    The images are random: the timing does not depend on their content, and there is no SOP copy here. The same
    code runs on the CPU (``device="cpu"``) for testing. With ``compile`` the model is compiled before the clock
    starts; every batch has the same shape (the last one is padded), so nothing recompiles while it runs.
    """
    from metricsearch.metrics import calc_retrieval_metrics

    device = torch.device(device)
    cuda = device.type == "cuda"
    setting = TrainSetting(backbone=backbone, image_size=image_size, embedding_dim=embedding_dim)
    model, _, _ = build_parts(setting)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    augment = BatchAugment(image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).to(device)
    images = torch.empty((num_items, image_size, image_size, 3), dtype=torch.uint8)
    images = images.pin_memory() if cuda else images
    for start in range(0, num_items, 8192):
        images[start : start + 8192].random_(0, 256)
    embeddings = torch.empty((num_items, embedding_dim), device=device)

    def embed_batch(batch: torch.Tensor) -> torch.Tensor:
        count = len(batch)
        if count < batch_size:  # pad, so that a compiled model sees one shape only
            batch = torch.cat([batch, batch.new_zeros((batch_size - count, *batch.shape[1:]))])
        inputs = augment.normalize_uint8(batch).contiguous(memory_format=torch.channels_last)
        return model(inputs)[:count].float()

    def embed() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            for start in range(0, num_items, batch_size):
                batch = images[start : start + batch_size].to(device, non_blocking=True)
                embeddings[start : start + len(batch)] = embed_batch(batch)

    num_warmup = min(num_items, 4 * batch_size)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(2):  # compilation, then one run of the compiled code
            embed_batch(images[:batch_size].to(device))
    calc_retrieval_metrics(np.random.default_rng(0).standard_normal((num_warmup, 8), dtype=np.float32),
                           labels[:num_warmup], (1, 10), compute_nmi=False, device=device)  # fmt: skip
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    synchronize()
    started = time.perf_counter()
    embed()
    synchronize()
    embedded = time.perf_counter()
    metrics = calc_retrieval_metrics(
        embeddings.cpu().numpy(), labels, (1, 10, 100, 1000), compute_nmi=False, device=device
    )
    finished = time.perf_counter()
    log(f"  embedding {embedded - started:.2f} s, metrics {finished - embedded:.2f} s ({device.type})")
    return {
        "seconds": finished - started,
        "embedding_seconds": embedded - started,
        "metric_seconds": finished - embedded,
        "images_per_s": num_items / (embedded - started),
        "num_items": num_items,
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "compiled": compile,
        "metrics_of_random_images": metrics,
    }
