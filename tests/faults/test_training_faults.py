"""Fault injection: every bad input or crash gives a clear message and loses nothing the user made."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metricsearch.data.io import atomic_path, atomic_write_text
from metricsearch.utils.checkpoint_io import AtomicCheckpointIO
from tests.conftest import REPO_ROOT
from tests.test_train import run_train


def test_unknown_config_option(tmp_path, data_dir):
    result = run_train(["optimizer=adamx"], tmp_path / "run", data_dir)
    assert result.returncode != 0
    assert "Could not find 'optimizer/adamx'" in result.stderr and "adamw" in result.stderr


def test_unknown_key(tmp_path, data_dir):
    result = run_train(["trainer.max_epoch=3"], tmp_path / "run", data_dir)
    assert result.returncode != 0
    assert "Could not override 'trainer.max_epoch'" in result.stderr


def test_impossible_batch_setting(tmp_path, data_dir):
    result = run_train(["data.batch_size=16", "sampler.m=3"], tmp_path / "run", data_dir)
    assert result.returncode != 0
    assert "data.batch_size=16 is not divisible by sampler.m=3" in result.stderr


def test_checkpoint_from_another_backbone(tmp_path, data_dir):
    first = tmp_path / "first"
    assert run_train([], first, data_dir).returncode == 0
    last = first / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    result = run_train([f"ckpt_path={last}", "backbone=resnet18"], tmp_path / "second", data_dir)
    assert result.returncode != 0
    assert "holds backbone resnet10t with 16-d embeddings, but this run builds resnet18" in result.stderr
    assert last.read_bytes() == before


def test_unwritable_output_folder(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_train([], blocker / "run", data_dir)
    assert result.returncode != 0
    assert str(blocker) in result.stderr and "Not a directory" in result.stderr


def test_disk_full_part_way_keeps_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, '{"ok": 1}')
    text = '{"ok": 2, "padding": "' + "x" * 1000 + '"}'
    with pytest.raises(OSError, match="No space left"), atomic_path(target) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text[: len(text) // 2])  # half of it reached the disk, then it filled up
        raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoint_write_failing_part_way_keeps_the_last_good_one(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:  # leave a truncated file behind, as a full disk would
            handle.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=False)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_nonfinite_losses_stop_training_with_checkpoints_intact(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    assert run_train(["trainer.max_epochs=1"], run_dir, data_dir).returncode == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # A zero temperature divides similarities by zero: every loss is NaN. The rerun in the same folder must
    # stop with a clear message and leave the earlier checkpoint as it was.
    result = run_train(
        ["loss=ntxent", "loss.temperature=0.0", "module.max_nonfinite_steps=2", "trainer.limit_train_batches=4"],
        run_dir,
        data_dir,
    )
    assert result.returncode != 0
    assert "for 2 steps in a row" in result.stderr and "training diverged and was stopped" in result.stderr
    assert last.read_bytes() == before


def test_isolated_nonfinite_step_is_skipped_and_counted(tmp_path, data_dir):
    import lightning as L

    from metricsearch.data.dataset import IMAGE, INDEX, LABEL
    from metricsearch.pipelines.train import build_run
    from tests.conftest import compose_config

    module, _ = build_run(compose_config([], tmp_path, data_dir))
    labels = torch.arange(4).repeat_interleave(4)
    good = {IMAGE: torch.randn(16, 3, 32, 32), LABEL: labels, INDEX: torch.arange(16)}
    poisoned = {**good, IMAGE: good[IMAGE].clone()}
    poisoned[IMAGE][0] = float("nan")  # one NaN image: the batch's loss is NaN

    def fit(batches):
        trainer = L.Trainer(
            max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
        )
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))

    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit([poisoned])
    assert module.nonfinite_steps == 1 and module.nonfinite_in_a_row == 1
    after = module.state_dict()
    # Neither the weights nor BatchNorm's running statistics took anything from the NaN batch.
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "a NaN step changed the model"
    fit([poisoned, good])
    assert module.nonfinite_steps == 2 and module.nonfinite_in_a_row == 0
    assert all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point())


def test_sigkill_during_training_then_resume(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # NOTE: enough epochs that the run cannot finish between the first checkpoint and the kill (a tiny epoch takes
    # a fraction of a second).
    epochs = 8
    args = [f"trainer.max_epochs={epochs}", "trainer.limit_train_batches=3", "trainer.deterministic=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    from tests.conftest import TINY

    cmd = [sys.executable, "train.py", *TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not last.exists():
        time.sleep(0.2)
    assert last.exists(), "no checkpoint appeared"
    time.sleep(0.2)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    torch.load(last, weights_only=False)  # loads: never truncated

    resumed = run_train(["resume=auto", *args], run_dir, data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: continuing" in resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["epochs_trained"] == epochs

    reference_dir = tmp_path / "uninterrupted"
    assert run_train(args, reference_dir, data_dir).returncode == 0
    reference = json.loads((reference_dir / "metrics.json").read_text())
    # Same number of optimizer steps as the uninterrupted run: the resumed run neither skipped nor repeated work.
    assert summary["global_step"] == reference["global_step"] == epochs * 2  # 2 batches per epoch of the tiny split
    assert summary["metrics"]["test"] == pytest.approx(reference["metrics"]["test"], abs=1e-6)


def test_missing_checkpoint_path(tmp_path, data_dir):
    result = run_train(["ckpt_path=/nonexistent/last.ckpt"], tmp_path / "run", data_dir)
    assert result.returncode != 0
    assert "ckpt_path=/nonexistent/last.ckpt does not exist" in result.stderr


def test_truncated_checkpoint(tmp_path, data_dir):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = run_train([f"ckpt_path={bad}"], tmp_path / "run", data_dir)
    assert result.returncode != 0
    assert f"cannot read checkpoint {bad}" in result.stderr
