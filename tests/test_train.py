"""`python train.py` end to end as a subprocess: checkpoints, metrics JSON, resume, and start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, TINY, run_train


def test_train_end_to_end_then_resume(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = run_train([], run_dir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    for split in ("untrained", "test"):
        metrics = summary["metrics"][split]
        for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"):
            assert 0.0 <= metrics[key] <= 1.0
    assert "recall@1" in summary["metrics"]["val_best"]
    # Every test image has classmates: no query is left out, and the count says so.
    assert summary["metrics"]["test"]["num_queries_left_out"] == 0 and summary["metrics"]["test"]["num_queries"] > 0
    assert (run_dir / "config.yaml").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and Path(summary["best_checkpoint"]).is_file()
    assert "recall@1" in result.stdout and "untrained" in result.stdout  # the printed table
    # Third-party INFO chatter (faiss's loader trying AVX512 / AVX2 builds, Lightning's accelerator lines) goes to
    # the run's log file, not the console; our own progress lines stay on the console.
    console, run_log = result.stdout + result.stderr, (run_dir / "train.log").read_text()
    assert "faiss.loader" in run_log and "GPU available" in run_log
    assert "swigfaiss" not in console and "faiss.loader" not in console and "GPU available" not in console
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["model_config"]["head"]["embedding_dim"] == 16

    resumed_dir = tmp_path / "resumed"
    result = run_train([f"ckpt_path={last}", "trainer.max_epochs=2", "test_untrained=false"], resumed_dir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((resumed_dir / "metrics.json").read_text())
    # One more epoch of 2 batches on top of the restored 2 steps: training continued from the checkpoint's epoch.
    assert resumed["global_step"] == 4
    assert resumed["epochs_trained"] == 2
    assert "Restoring states from the checkpoint" in (resumed_dir / "train.log").read_text()
    assert "Restoring states from the checkpoint" not in result.stderr + result.stdout


@pytest.mark.slow
def test_multirun_over_losses(tmp_path, data_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        *TINY,
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={tmp_path}",
        "loss=triplet,multi_similarity,proxy_anchor,arcface",
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in range(4):
        assert "recall@1" in json.loads((tmp_path / str(job) / "metrics.json").read_text())["metrics"]["test"]
