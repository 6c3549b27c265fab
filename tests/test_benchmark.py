"""The benchmark at toy sizes: every section runs, the report is written, ours and the peers agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metricsearch.utils.benchmark import run_benchmark
from metricsearch.utils.benchmark_eval import EvalData, make_embeddings, sop_like_class_sizes
from metricsearch.utils.benchmark_train import TrainSetting, measure_gpu_evaluation


def test_sop_like_data_has_the_requested_shape():
    data = EvalData(num_items=6_050, num_classes=1_131, dim=16)
    sizes = sop_like_class_sizes(data, np.random.default_rng(0))
    assert sizes.sum() == 6_050 and sizes.min() >= 2 and sizes.max() <= 12
    assert np.bincount(sizes)[2] > np.bincount(sizes)[12]  # decaying, like SOP
    x, labels = make_embeddings(data)
    assert x.shape == (6_050, 16) and x.dtype == np.float32 and len(np.unique(labels)) == 1_131
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_benchmark_runs_every_cpu_section_at_toy_size(tmp_path, data_dir):
    tiny_train = TrainSetting(
        backbone="resnet10t", image_size=32, batch_size=16, warmup_steps=2, steps=3, num_workers=0,
        num_classes=12, images_per_class=8, source_size=32,
    )  # fmt: skip
    settings = {"eval": EvalData(num_items=1_200, num_classes=220, dim=32), "overhead": tiny_train, "train": tiny_train}
    report = run_benchmark(tmp_path / "out", settings=settings, data_dir=data_dir, log=lambda _: None)
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text())["targets"] == report["targets"]
    markdown = (tmp_path / "out" / "benchmark.md").read_text()
    assert "Lightning step / plain PyTorch loop step" in markdown and "needs CUDA" in markdown
    evaluation = report["evaluation"]
    assert max(evaluation["max_abs_diff_vs_pml"].values()) < 1e-9
    assert max(evaluation["max_abs_diff_screens"].values()) == 0.0  # the screen changes the speed only
    assert evaluation["ours"]["screen"] in ("int8", "bfloat16", "float32") and "float32 screen" in markdown
    assert max(evaluation["max_abs_diff_vs_torchmetrics"].values()) < 1e-6
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
