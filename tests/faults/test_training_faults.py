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

from metricsearch.utils import checkpoint_io
from metricsearch.utils.atomic_io import atomic_path, atomic_write_text
from metricsearch.utils.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from tests.helpers import REPO_ROOT, TINY, run_train


def test_unknown_config_option(tmp_path, data_dir):
    result = run_train(["optimizer=adamx"], tmp_path / "run", data_dir)
    assert result.returncode == 2
    options = ", ".join(sorted(p.stem for p in (REPO_ROOT / "conf" / "optimizer").glob("*.yaml")))
    assert result.stderr.strip() == f"error: optimizer=adamx is not an option of conf/optimizer ({options})"
    assert "adamw" in options


def test_unknown_key(tmp_path, data_dir):
    result = run_train(["trainer.max_epoch=3"], tmp_path / "run", data_dir)
    assert result.returncode != 0
    assert "Could not override 'trainer.max_epoch'" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["data.batch_size=16", "sampler.m=3"], "data.batch_size=16 is not divisible by sampler.m=3"),
        (["data.batch_size=18", "sampler.m=4"], "data.batch_size=18 is not divisible by sampler.m=4"),
        (["sampler.m=16", "data.batch_size=32"], "sampler.m=16 is larger than the smallest training class (8 images"),
    ],
)
def test_impossible_batch_setting_fails_at_start_up(tmp_path, data_dir, args, message):
    result = run_train(args, tmp_path / "run", data_dir)
    assert result.returncode != 0
    assert message in result.stderr


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


TORCH_WRITER_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054"


def _writer_failing_part_way(error: BaseException):
    """A torch.save that writes half of the file, as a filling disk does, then fails with ``error``."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        size = os.path.getsize(f)
        with open(f, "r+b") as handle:
            handle.truncate(size // 2)
        raise error

    return save


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError(TORCH_WRITER_FAILURE), "the checkpoint writer stopped part way"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ],
    ids=["torch-writer", "enospc"],
)
def test_checkpoint_disk_full_is_one_line_and_leaves_nothing_partial(tmp_path, monkeypatch, error, reason):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(torch, "save", _writer_failing_part_way(error))
    monkeypatch.setattr(checkpoint_io, "free_bytes", lambda folder: 3 * 2**20 // 10)  # what a full disk has left
    with pytest.raises(CheckpointWriteError) as caught:
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    message = str(caught.value)
    assert message == (
        f"disk full while writing {path} ({reason}): 0.3 MB free in {path.parent}; free space there, or point "
        "hydra.run.dir (or paths.output_dir) at a disk with room"
    )
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_checkpoint_writer_failure_with_room_left_is_not_called_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    monkeypatch.setattr(torch, "save", _writer_failing_part_way(RuntimeError(TORCH_WRITER_FAILURE)))
    monkeypatch.setattr(checkpoint_io, "free_bytes", lambda folder: 50 * 2**30)
    with pytest.raises(CheckpointWriteError) as caught:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, path)
    assert str(caught.value) == (
        f"could not write checkpoint {path} ({TORCH_WRITER_FAILURE}); 51200.0 MB free in {tmp_path}"
    )
    assert list(tmp_path.iterdir()) == []


def test_train_reports_a_full_disk_in_one_line(tmp_path, data_dir):
    """train.py itself, with the checkpoint writer failing as it does on a full disk (before: 64 lines ending in
    ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos``)."""
    run_dir = tmp_path / "run"
    inject = (
        "import runpy, sys, torch; import metricsearch.utils.checkpoint_io as io\n"
        "def save(obj, f, *a, **k):\n"
        "    open(f, 'wb').write(b'PK partial')\n"
        f"    raise RuntimeError({TORCH_WRITER_FAILURE!r})\n"
        "torch.save = save; io.free_bytes = lambda folder: 2**19\n"
        "sys.argv = ['train.py', *sys.argv[1:]]; runpy.run_path('train.py', run_name='__main__')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-c", inject, *TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: disk full while writing {run_dir / 'checkpoints'}/")
    assert "0.5 MB free" in last_line and "hydra.run.dir" in last_line
    assert not (run_dir / "checkpoints").exists() or list((run_dir / "checkpoints").iterdir()) == []


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
    from tests.helpers import compose_config

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


# Enough epochs that a run killed at its first checkpoint is still far from done; the tests hold either way.
KILL_EPOCHS = 8
KILL_ARGS = [f"trainer.max_epochs={KILL_EPOCHS}", "trainer.limit_train_batches=3", "trainer.deterministic=true"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> dict:
    """metrics.json of the run the killed and resumed runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(KILL_ARGS, run_dir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def _run_and_kill_at_first_checkpoint(run_dir, data_dir) -> bool:
    """Starts ``train.py KILL_ARGS`` into ``run_dir`` and SIGKILLs it as soon as ``last.ckpt`` exists.

    Returns whether the run had finished anyway (its metrics.json exists), which a slow poll on a busy machine
    cannot rule out; callers assert what must hold in both cases.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", *TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *KILL_ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        # NOTE: polls only for the file (atomically renamed into place, so complete once it exists) or the process
        # ending; the guard only keeps a hung run from hanging the suite.
        guard = time.monotonic() + 600
        while not last.exists() and proc.poll() is None and time.monotonic() < guard:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert last.exists(), f"no checkpoint appeared: {stderr.decode(errors='replace')[-3000:]}"
    torch.load(last, weights_only=True)  # loads: never truncated
    return (run_dir / "metrics.json").exists()


def _assert_same_as_uninterrupted(summary: dict, reference: dict) -> None:
    assert summary["epochs_trained"] == KILL_EPOCHS
    # Same number of optimizer steps as the uninterrupted run: the resumed run neither skipped nor repeated work.
    assert summary["global_step"] == reference["global_step"] == KILL_EPOCHS * 2  # 2 batches per tiny epoch
    assert summary["metrics"]["test"] == pytest.approx(reference["metrics"]["test"], abs=1e-6)


def test_sigkill_during_training_then_resume(tmp_path, data_dir, uninterrupted):
    run_dir = tmp_path / "run"
    finished = _run_and_kill_at_first_checkpoint(run_dir, data_dir)

    # The same command into the same folder continues its last.ckpt (a finished run's too: it is tested again).
    resumed = run_train(["resume=auto", *KILL_ARGS], run_dir, data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: continuing" in resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "metrics.json").read_text())
    _assert_same_as_uninterrupted(summary, uninterrupted)
    if not finished:
        assert not list((run_dir / "checkpoints").glob(".*tmp*")), "a partial checkpoint was left behind"


@pytest.mark.slow
def test_sigkill_then_plain_rerun_in_a_new_folder_resumes(tmp_path, data_dir, uninterrupted):
    """What a plain rerun of the same command gets is a new (timestamped) run folder next to the killed one:
    resume=auto must find the killed run there, although their configs differ in run-folder paths and resume."""
    killed, rerun_dir = tmp_path / "runs" / "A", tmp_path / "runs" / "B"
    finished = _run_and_kill_at_first_checkpoint(killed, data_dir)

    rerun = run_train(["resume=auto", *KILL_ARGS], rerun_dir, data_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    output = rerun.stdout + rerun.stderr
    if finished:
        # The killed run had completed: nothing to continue, the rerun trains afresh in its own folder.
        assert "starting afresh" in output
        summary = json.loads((rerun_dir / "metrics.json").read_text())
    else:
        assert f"resume=auto: continuing {killed} from {killed / 'checkpoints' / 'last.ckpt'}" in output
        assert "starting afresh" not in output
        summary = json.loads((killed / "metrics.json").read_text())
        assert not (rerun_dir / "checkpoints").exists() and not (rerun_dir / "metrics.json").exists()
    _assert_same_as_uninterrupted(summary, uninterrupted)


def test_corrupt_last_checkpoint_under_resume_auto_is_one_line(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 truncated by a crash")
    result = run_train(["resume=auto"], run_dir, data_dir)
    assert result.returncode != 0
    # Before: the right refusal inside a 23-27-line double traceback.
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        f"error: cannot read checkpoint {last}: it is truncated or corrupt: its zip archive has no end; delete it (or "
        "move it away) and rerun, or run without resume=auto to start afresh"
    )
    assert last.read_bytes() == b"PK\x03\x04 truncated by a crash"
    assert not (run_dir / "untrained_metrics.json").exists()


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


# ---------------------------------------------------------------------------------------------------------------
# Settings that failed late or read files from outside conf/: refused by train.py in one line, status 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["seed=-1"], "seed=-1 must be at least 0"),
        (["seed=4294967296"], "seed=4294967296 is over 4294967295"),
        (["optimizer.lr=nan"], "optimizer.lr=nan is not a finite number"),
        (["loss=doesnotexist"], "loss=doesnotexist is not an option of conf/loss (anchor_positive_softmax, arcface"),
        (["experiment=../../x"], "experiment=../../x is a path, not an option name: name one of the options of"),
    ],
    ids=["negative-seed", "seed-over-numpy", "nan-lr", "unknown-option", "option-path"],
)
def test_a_setting_that_would_fail_late_is_one_line_at_start_up(args, message, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = run_train(args, run_dir, data_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr[-2000:]
    assert not (run_dir / "checkpoints").exists()


def test_an_experiment_named_by_a_path_outside_conf_is_never_composed(tmp_path, data_dir):
    evil = tmp_path / "elsewhere" / "evil.yaml"
    evil.parent.mkdir()
    evil.write_text("# @package _global_\ntask_name: PWNED-BY-CONFIG\n")
    climbing = os.path.relpath(evil.with_suffix(""), REPO_ROOT / "conf" / "experiment")
    run_dir = tmp_path / "run"
    result = run_train([f"experiment={climbing}"], run_dir, data_dir)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: experiment={climbing} is a path, not an option name")
    assert "PWNED" not in result.stdout + result.stderr and not run_dir.exists()


def test_a_file_that_is_no_checkpoint_is_refused_in_plain_words(tmp_path, data_dir):
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    result = run_train([f"ckpt_path={passwd}"], tmp_path / "run", data_dir)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: cannot read checkpoint {passwd}: it is not a PyTorch checkpoint: torch.save writes a zip archive, "
        "and this file is not one; pass another checkpoint as ckpt_path=..., or drop ckpt_path to start afresh"
    )
