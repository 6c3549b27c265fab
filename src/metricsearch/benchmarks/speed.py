"""The speed-and-scale benchmark: one run measures evaluation, Lightning's overhead and training throughput.

``python scripts/benchmark.py`` calls :func:`run_speed_benchmark`, which writes ``benchmark.json`` (every number) and
``benchmark.md`` (a summary with the targets) to the output folder. It measures whatever machine it runs on: the
CPU sections always, the GPU sections (ResNet-50 training throughput with the fast path, the whole SOP-size test
evaluation on the GPU) when CUDA is available; the report says which targets were measured and which were not.

Sections:

- ``eval``: Recall@1/10/100/1000 + R-Precision + MAP@R over SOP-size embeddings, ours vs pytorch-metric-learning's
  AccuracyCalculator (time, peak RSS, equal values), and vs torchmetrics on a subset it can handle.
- ``query_gallery``: the same metrics for queries searched in a separate gallery at DeepFashion In-Shop size
  (14,218 queries x 12,612 gallery items x 512), on the CPU (and the GPU), vs AccuracyCalculator.
- ``overhead``: the same model, loss and in-memory data in a hand-written PyTorch loop vs our Lightning module.
- ``train``: training images/s with the PIL data path and with the uint8-cache fast path (and the model alone).
- ``gpu_eval``: embedding + search + metrics of a SOP-size test set on the GPU (CUDA only).

The sections are measured in :mod:`~metricsearch.benchmarks.evaluation` (``eval``) and
:mod:`~metricsearch.benchmarks.training` (the others); :mod:`~metricsearch.benchmarks.report` writes the report.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from metricsearch.benchmarks import SECTIONS
from metricsearch.benchmarks.evaluation import (
    EvalData,
    QueryGalleryData,
    make_embeddings,
    measure_evaluation,
    measure_query_gallery,
)
from metricsearch.benchmarks.report import write_speed_report
from metricsearch.benchmarks.training import (
    TrainSetting,
    measure_data_path,
    measure_gpu_evaluation,
    measure_lightning_overhead,
    measure_model_only,
)

# The targets of the issue: (key, description, comparison, threshold, device the target is stated for).
TARGETS = (
    ("lightning_overhead", "Lightning step / plain PyTorch loop step, CPU time (CPU)", "<=", 1.10, "cpu"),
    ("eval_speedup", "SOP-size evaluation: AccuracyCalculator time / ours (CPU)", ">=", 2.0, "cpu"),
    ("eval_memory", "SOP-size evaluation: our peak RSS / AccuracyCalculator's (CPU)", "<=", 0.2, "cpu"),
    ("gpu_train", "ResNet-50 @224 bf16 training with the fast path, images/s (H200)", ">=", 6000.0, "cuda"),
    ("gpu_eval", "Whole SOP test evaluation: embedding + search + metrics, s (H200)", "<=", 6.0, "cuda"),
)


CPU_FEATURES = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"}
ISA_LIMITS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "OPENBLAS_CORETYPE",
    "NUMBA_CPU_NAME",
)


def machine_info() -> dict[str, Any]:
    """What the numbers came from, including the load: this benchmark is often run on shared machines."""
    import psutil

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # What the screens depend on; the ISA limits say whether this run emulated a smaller CPU.
        "cpu_features": sorted(flags & CPU_FEATURES),
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info


def default_settings(cuda: bool, quick: bool) -> dict[str, Any]:
    """The sizes of each section on this kind of machine; ``quick`` shrinks them for a first look."""
    overhead = TrainSetting(backbone="resnet10t", image_size=64, batch_size=64, warmup_steps=4, steps=20, threads=1)
    if cuda:
        train = TrainSetting(
            backbone="resnet50",
            image_size=224,
            batch_size=256,
            precision="bf16-mixed",
            channels_last=True,
            compile=True,
            embedding_dim=512,
            warmup_steps=15,
            steps=40,
            num_workers=min(16, os.cpu_count() or 1),
            accelerator="gpu",
            num_classes=128,
            images_per_class=8,
            source_size=256,
        )
    else:
        # NOTE: one compute thread, so that the two data paths compete for the same resources whatever else
        # runs on the machine; the data workers have the other core(s).
        train = TrainSetting(backbone="resnet10t", image_size=64, batch_size=64, warmup_steps=3, steps=15, threads=1)
    data = EvalData()
    query_gallery = QueryGalleryData()
    if quick:
        overhead = replace(overhead, steps=10, warmup_steps=3)
        train = replace(train, steps=max(8, train.steps // 3))
        data = replace(data, num_items=12_100, num_classes=2_263)
        query_gallery = replace(query_gallery, num_queries=3_555, num_gallery=3_153, num_classes=996)
    return {"overhead": overhead, "train": train, "eval": data, "query_gallery": query_gallery}


def run_speed_benchmark(
    out_dir: Path,
    *,
    sections: Sequence[str] = SECTIONS,
    quick: bool = False,
    data_dir: Path | None = None,
    log: Callable[[str], None] = print,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs the chosen sections and writes ``benchmark.json`` and ``benchmark.md`` to ``out_dir``.

    Args:
        out_dir: where the report goes (and scratch files, removed afterwards).
        sections: any of ``eval``, ``query_gallery``, ``overhead``, ``train``, ``gpu_eval``; GPU-only ones are
            skipped without CUDA.
        quick: smaller sizes (minutes instead of ~10 on two cores); the SOP-size targets are then not measured.
        data_dir: where the synthetic training images and their caches are generated (reused across runs);
            default ``$METRICSEARCH_DATA/benchmark`` or ``data/benchmark``.
        log: progress messages.
        settings: overrides of :func:`default_settings` (tests use tiny ones).

    Returns:
        The report (also written as JSON).
    """
    cuda = torch.cuda.is_available()
    settings = {**default_settings(cuda, quick), **(settings or {})}
    out_dir = Path(out_dir)
    if data_dir is None:
        # Beside the project's other generated data (git-ignored), not in the report folder.
        data_dir = Path(os.environ.get("METRICSEARCH_DATA", "data")) / "benchmark"
    report: dict[str, Any] = {"machine": machine_info(), "quick": quick, "sections": list(sections)}
    started = time.perf_counter()

    if "eval" in sections:
        log("== evaluation")
        with tempfile.TemporaryDirectory(prefix="metricsearch-benchmark-") as scratch:
            report["evaluation"] = measure_evaluation(settings["eval"], Path(scratch), with_cuda=cuda, log=log)
    if "query_gallery" in sections:
        log("== query / gallery evaluation (In-Shop size)")
        with tempfile.TemporaryDirectory(prefix="metricsearch-benchmark-") as scratch:
            report["query_gallery"] = measure_query_gallery(
                settings["query_gallery"], Path(scratch), with_cuda=cuda, log=log
            )
    if "overhead" in sections:
        log("== Lightning overhead (CPU)")
        setting = replace(settings["overhead"], accelerator="cpu")
        report["lightning_overhead"] = {"setting": asdict(setting), **measure_lightning_overhead(setting, log=log)}
        log(f"  ratio {report['lightning_overhead']['ratio']:.3f}")
    if "train" in sections:
        setting = settings["train"]
        log(f"== training images/s ({setting.backbone} @{setting.image_size}, batch {setting.batch_size}, "
            f"{setting.precision}, {setting.accelerator})")  # fmt: skip
        training: dict[str, Any] = {"setting": asdict(setting)}
        for name, cache in (("pil", None), ("fast", "uint8")):
            training[name] = measure_data_path(setting, data_dir, cache)
            log(f"  {name} path: {training[name]['images_per_s']:.0f} images/s")
        training["model_only"] = measure_model_only(setting)
        log(f"  model alone: {training['model_only']['images_per_s']:.0f} images/s")
        training["fast_over_pil"] = training["fast"]["images_per_s"] / training["pil"]["images_per_s"]
        report["training"] = training
    if "gpu_eval" in sections and cuda:
        log("== whole SOP-size test evaluation on the GPU")
        data = settings["eval"]
        _, labels = make_embeddings(replace(data, dim=8))  # the labels of the SOP-like set; images are random
        report["gpu_evaluation"] = measure_gpu_evaluation(data.num_items, labels, log=log)

    report["seconds"] = time.perf_counter() - started
    report["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["targets"] = check_targets(report, settings["eval"])
    write_speed_report(report, out_dir)
    return report


def check_targets(report: dict[str, Any], data: EvalData) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met, or why it was not measured on this run."""
    full_size = data.num_items >= 60_502
    evaluation = report.get("evaluation", {})
    training = report.get("training", {})
    values: dict[str, tuple[float | None, str | None]] = {
        "lightning_overhead": (report.get("lightning_overhead", {}).get("ratio"), None),
        "eval_speedup": (evaluation.get("speedup_vs_pml"), None if full_size else "not at SOP size (--quick)"),
        "eval_memory": (evaluation.get("memory_ratio_vs_pml"), None if full_size else "not at SOP size (--quick)"),
        "gpu_train": (None, "needs CUDA"),
        "gpu_eval": (report.get("gpu_evaluation", {}).get("seconds"), None),
    }
    setting = training.get("setting", {})
    if setting.get("accelerator") == "gpu" and setting.get("backbone") == "resnet50":
        values["gpu_train"] = (training["fast"]["images_per_s"], None)
    gpu_name = report["machine"].get("cuda") or ""
    targets = []
    for key, description, comparison, threshold, device in TARGETS:
        value, reason = values[key]
        if value is None and reason is None:
            reason = "needs CUDA" if device == "cuda" else "section not run"
        if device == "cuda" and value is not None and "H200" not in gpu_name:
            reason = f"measured on {gpu_name}, not an H200"
        met = None
        if value is not None and reason is None:
            met = value <= threshold if comparison == "<=" else value >= threshold
        targets.append(
            {
                "target": key,
                "description": description,
                "threshold": f"{comparison} {threshold:g}",
                "value": value,
                "met": met,
                "not_measured": reason if value is None else None,
                "note": reason if value is not None else None,
            }
        )
    return targets
