"""The benchmark at toy sizes: every section runs, the report is written, ours and the peers agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metricsearch.benchmarks.evaluation import (
    EvalData,
    QueryGalleryData,
    emulated_screens,
    make_embeddings,
    sop_like_class_sizes,
)
from metricsearch.benchmarks.report import render_markdown
from metricsearch.benchmarks.speed import run_speed_benchmark
from metricsearch.benchmarks.training import TrainSetting, measure_gpu_evaluation
from metricsearch.metrics.screen import ScreenProbe


def test_sop_like_data_has_the_requested_shape():
    data = EvalData(num_items=6_050, num_classes=1_131, dim=16)
    sizes = sop_like_class_sizes(data, np.random.default_rng(0))
    assert sizes.sum() == 6_050 and sizes.min() >= 2 and sizes.max() <= 12
    assert np.bincount(sizes)[2] > np.bincount(sizes)[12]  # decaying, like SOP
    x, labels = make_embeddings(data)
    assert x.shape == (6_050, 16) and x.dtype == np.float32 and len(np.unique(labels)) == 1_131
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_forced_screens_that_are_emulated_are_skipped():
    def probes(**seconds):
        return {name: ScreenProbe(seconds=value, error=0.001, margin=0.01) for name, value in seconds.items()}

    # AVX2 only: both emulated (the times an AVX2 EPYC gave for a 1024 x 2048 x 512 block, in seconds).
    avx2 = emulated_screens(probes(float32=0.011, bfloat16=0.052, int8=0.12))
    assert set(avx2) == {"ours_bfloat16", "ours_int8"} and "emulated" in avx2["ours_int8"]
    # AVX512-BF16 + VNNI: both are forced, even though the default picks only one of them.
    assert emulated_screens(probes(float32=0.012, bfloat16=0.0025, int8=0.002)) == {}
    # A product faster than float32 but not by 1.5x is not emulated, and not worth forcing either.
    assert "not 1.5x faster" in emulated_screens(probes(float32=0.0098, bfloat16=0.052, int8=0.0071))["ours_int8"]
    # VNNI only, and no bfloat16 product in this build of torch.
    assert set(emulated_screens(probes(float32=0.012, int8=0.004))) == {"ours_bfloat16"}
    inaccurate = {**probes(float32=0.012, int8=0.004), "bfloat16": ScreenProbe(0.001, error=0.5, margin=0.01)}
    assert "outside its error margin" in emulated_screens(inaccurate)["ours_bfloat16"]


def test_the_report_shows_skipped_screens_and_the_nmi_cost():
    skipped = {"method": "ours_int8", "skipped": "skipped: emulated on this CPU (int8 product 120.0 ms vs ...)"}
    evaluation = {
        "data": {"num_items": 60_502, "dim": 512, "num_classes": 11_316},
        "ours_int8": skipped,
        "nmi": {
            "macs_per_iteration": 3.5e11,
            "full_schedule": {"niter": 20, "nredo": 5},
            "cpu_budget_macs": 2e11,
            "cpu_schedule": None,
            "cpu_one_iteration": {"seconds": 14.0},
            "cpu_full_schedule_seconds_estimate": 1400.0,
        },
    }
    machine = {"cpu": "AMD EPYC", "cpu_cores": 2, "memory_gb": 25, "torch": "2.14", "cpu_features": ["avx2", "fma"],
               "isa_limits": {"ATEN_CPU_CAPABILITY": "avx2"}}  # fmt: skip
    report = {"machine": machine, "targets": [], "evaluation": evaluation, "seconds": 60.0}
    markdown = render_markdown(report)
    assert "(avx2, fma), limited by ATEN_CPU_CAPABILITY=avx2" in markdown
    assert "| ours (CPU, int8 screen) | skipped: emulated on this CPU" in markdown
    assert "14.0 s per iteration" in markdown and "~23 min" in markdown and "left out on the CPU" in markdown


@pytest.mark.slow
def test_benchmark_runs_every_cpu_section_at_toy_size(tmp_path, data_dir):
    tiny_train = TrainSetting(
        backbone="resnet10t", image_size=32, batch_size=16, warmup_steps=2, steps=3, num_workers=0,
        num_classes=12, images_per_class=8, source_size=32,
    )  # fmt: skip
    settings = {
        "eval": EvalData(num_items=1_200, num_classes=220, dim=32),
        "query_gallery": QueryGalleryData(num_queries=300, num_gallery=250, num_classes=80, dim=32),
        "overhead": tiny_train,
        "train": tiny_train,
    }
    report = run_speed_benchmark(tmp_path / "out", settings=settings, data_dir=data_dir, log=lambda _: None)
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text())["targets"] == report["targets"]
    markdown = (tmp_path / "out" / "benchmark.md").read_text()
    assert "Lightning step / plain PyTorch loop step" in markdown and "needs CUDA" in markdown
    evaluation = report["evaluation"]
    assert max(evaluation["max_abs_diff_vs_pml"].values()) < 1e-9
    assert max(evaluation["max_abs_diff_screens"].values()) == 0.0  # the screen changes the speed only
    assert evaluation["ours"]["screen"] in ("int8", "bfloat16", "float32") and "float32 screen" in markdown
    assert max(evaluation["max_abs_diff_vs_torchmetrics"].values()) < 1e-6
    assert evaluation["nmi"]["cpu_one_iteration"]["seconds"] > 0 and "NMI (k-means" in markdown
    assert report["lightning_overhead"]["ratio"] > 0
    assert report["training"]["pil"]["images_per_s"] > 0 and report["training"]["fast"]["images_per_s"] > 0
    met = {t["target"]: t for t in report["targets"]}
    assert met["gpu_train"]["met"] is None and met["eval_speedup"]["not_measured"] is None


@pytest.mark.slow
def test_gpu_evaluation_code_runs_on_the_cpu():
    labels = np.repeat(np.arange(50), 4)
    result = measure_gpu_evaluation(200, labels, backbone="resnet10t", image_size=32, batch_size=64, device="cpu",
                                    embedding_dim=16, compile=False, log=lambda _: None)  # fmt: skip
    assert result["metrics_of_random_images"]["num_queries"] == 200.0
    assert result["seconds"] > 0
