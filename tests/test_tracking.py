"""Experiment tracking: W&B mode choice, an offline W&B run end to end, and the pictures drawn into run folders."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from metricsearch.analysis import (
    choose_queries,
    draw_retrieval_grid,
    draw_run_retrieval,
    find_retrieval_examples,
    project_to_2d,
    read_csv,
    sample_evenly,
)
from metricsearch.analysis.retrieval_examples import CORRECT_COLOUR, QUERY_COLOUR, WRONG_COLOUR, fit_caption
from metricsearch.utils import loggers
from tests.helpers import REPO_ROOT, TINY

# ------------------------------------------------------------------------------------------- reading offline W&B runs
_BLOCK_SIZE = 32768
_HEADER_SIZE = 7


def read_wandb_records(path: Path) -> Iterator:
    """The protobuf records of a ``run-*.wandb`` file (W&B's LevelDB-style log: 32 KiB blocks of framed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = _HEADER_SIZE, b""
    while pos + _HEADER_SIZE <= len(data):
        left_in_block = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if left_in_block < _HEADER_SIZE:  # the tail of a block too small for a chunk header is padding
            pos += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER_SIZE])
        if length == 0 and kind == 0:  # zero padding up to the end of the block
            pos += left_in_block
            continue
        if pos + _HEADER_SIZE + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + _HEADER_SIZE : pos + _HEADER_SIZE + length]
        pos += _HEADER_SIZE + length
        # Chunk kinds: 1 a whole record, 2 its first part, 3 a middle part, 4 its last part.
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wait_for_records(path: Path, expected_artifacts: int, timeout: float = 240.0) -> list:
    """The records of a run file, re-read until it holds ``expected_artifacts`` artifact records; fails the test when
    it still holds fewer after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_wandb_records(path))
        artifacts = sum(r.WhichOneof("record_type") == "artifact" for r in records)
        if artifacts >= expected_artifacts:
            return records
        if time.monotonic() >= deadline:
            pytest.fail(f"{path} holds {artifacts} artifact records after {timeout:.0f} s, not {expected_artifacts}")
        time.sleep(0.5)


def test_waiting_for_records_fails_at_its_deadline(tmp_path):
    empty = tmp_path / "run-empty.wandb"
    empty.write_bytes(b":W&B" + bytes(_HEADER_SIZE - 4))  # a run file's header, no records yet
    assert list(read_wandb_records(empty)) == []
    with pytest.raises(pytest.fail.Exception, match="holds 0 artifact records after 0 s, not 1"):
        wait_for_records(empty, expected_artifacts=1, timeout=0)


# ---------------------------------------------------------------------------------------------------- W&B mode choice
@pytest.fixture
def no_wandb_account(tmp_path, monkeypatch):
    """An environment with no W&B mode, no API key and no ~/.netrc entry."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_wandb_mode_without_account_is_offline(no_wandb_account):
    assert not loggers.wandb_has_credentials()
    assert loggers.resolve_wandb_mode("auto") == "offline"
    assert loggers.resolve_wandb_mode("disabled") == "disabled"


def test_wandb_mode_environment_wins(no_wandb_account, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.resolve_wandb_mode("online") == "disabled"


def test_wandb_mode_with_credentials_but_no_network_is_offline_fast(no_wandb_account, monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1\n  login user\n  password 0123456789\n")
    monkeypatch.setenv("NETRC", str(netrc))
    # Port 9 (discard) is closed here: the connection is refused, as with a dead network or firewall.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert loggers.wandb_has_credentials()
    assert loggers.resolve_wandb_mode("auto", probe_timeout=2.0) == "offline"
    # The probe gets the caller's timeout (it is what bounds the wait: see the next test).
    timeouts = []
    monkeypatch.setattr(loggers, "wandb_host_reachable", lambda timeout=3.0: timeouts.append(timeout) or False)
    assert loggers.resolve_wandb_mode("auto", probe_timeout=2.0) == "offline" and timeouts == [2.0]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(loggers, "wandb_host_reachable", lambda timeout=3.0: True)
    assert loggers.resolve_wandb_mode("auto") == "online"


def test_the_reachability_probe_returns_while_a_connection_still_hangs(monkeypatch):
    # A resolver or connection that never answers (a dead network): the probe gives up at its timeout instead of
    # waiting for the connection; decided by an event, not by measuring time.
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait()
        raise OSError("released")

    monkeypatch.setattr(loggers.socket, "create_connection", hang)
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.invalid")
    try:
        assert loggers.wandb_host_reachable(timeout=0.05) is False
        assert not release.is_set()  # it returned while the connection attempt was still blocked
    finally:
        release.set()


def test_building_a_logger_finishes_a_stale_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    stale = wandb.init(dir=str(tmp_path), project="stale", settings={"silent": True})
    try:
        logger = loggers.build_wandb_logger(save_dir=str(tmp_path / "new"), project="new")
        assert wandb.run is None
        assert logger.experiment.id != stale.id
        loggers.finish_loggers([logger])
        assert wandb.run is None
    finally:
        wandb.finish()


# ------------------------------------------------------------------------------------------- retrieval examples, maps
def test_retrieval_examples_match_a_brute_force_search():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(10), 4)
    indices = np.arange(100, 140)  # dataset indices differ from row positions
    examples = find_retrieval_examples(x, labels, indices, num_queries=5, k=3, seed=1)
    assert len(set(examples.query_labels.tolist())) == 5  # distinct classes
    for q, query in enumerate(examples.query_indices):
        row = int(query) - 100
        scores = x @ x[row]
        order = [i for i in np.argsort(-scores, kind="stable") if i != row][:3]
        assert examples.neighbor_indices[q].tolist() == [i + 100 for i in order]
        assert np.allclose(examples.scores[q], scores[order], atol=1e-6)
        assert examples.correct[q].tolist() == [labels[i] == labels[row] for i in order]
    # The same labels and seed give the same queries: grids of successive epochs are comparable.
    again = find_retrieval_examples(rng.normal(size=(40, 8)), labels, indices, num_queries=5, k=3, seed=1)
    assert again.query_indices.tolist() == examples.query_indices.tolist()


def test_choose_queries_skips_singleton_classes():
    labels = np.array([0, 1, 1, 2, 3, 3])
    queries = choose_queries(labels, num_queries=10, seed=0)
    assert set(labels[queries].tolist()) <= {1, 3} and len(set(queries.tolist())) == len(queries)


def test_projection_falls_back_to_pca_on_small_sets_and_is_deterministic():
    x = np.random.default_rng(0).normal(size=(30, 16))
    coords, method = project_to_2d(x, "umap", umap_min_points=100)
    assert method == "pca" and coords.shape == (30, 2)
    assert np.array_equal(coords, project_to_2d(x, "pca")[0])
    assert sample_evenly(1000, 50, seed=3).tolist() == sample_evenly(1000, 50, seed=3).tolist()


def test_retrieval_grid_image_size(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (20, 30), (40 * i, 0, 0)).save(path)
        paths.append(path)
    x = np.eye(6, dtype=np.float32)
    examples = find_retrieval_examples(x, np.array([0, 0, 1, 1, 2, 2]), num_queries=2, k=3)
    grid = draw_retrieval_grid(examples, paths, thumbnail_size=32, border=2, title="")
    tile = 32 + 2 * 2
    gap = tile // 3
    assert grid.width == tile * 4 + gap and grid.height > 2 * tile
    # The query is framed blue, each neighbour green when it is of the query's class and red otherwise.
    assert grid.getpixel((0, 0)) == QUERY_COLOUR
    for r in range(3):
        expected = CORRECT_COLOUR if examples.correct[0, r] else WRONG_COLOUR
        assert grid.getpixel((tile + gap + r * tile, 0)) == expected
    # Captions name the classes when names are given (a folder's class names), else their ids.
    names = {0: "wren", 1: "kite", 2: "rook"}
    plain = draw_retrieval_grid(examples, paths, thumbnail_size=64)
    named = draw_retrieval_grid(examples, paths, thumbnail_size=64, class_names=names)
    assert named.size == plain.size
    caption_band = (0, 72, 72, 84)  # under the first query's tile (64 + 2 * 4 pixels)
    assert named.crop(caption_band).tobytes() != plain.crop(caption_band).tobytes()
    assert named.crop((0, 0, 72, 72)).tobytes() == plain.crop((0, 0, 72, 72)).tobytes()


def test_captions_are_shortened_to_the_tile():
    font = ImageFont.load_default(size=10)
    assert fit_caption("wren", font, 500, "query: ", "  0.93") == "query: wren  0.93"
    # Too long: the prefix goes first, then the middle of the name, keeping its start and end.
    name = "001.Black_footed_Albatross"
    assert fit_caption(name, font, font.getlength(name), "query: ") == name
    short = fit_caption(name, font, 60, suffix="  0.93")
    head, _, tail = short.removesuffix("  0.93").partition("…")
    assert head and tail and name.startswith(head) and name.endswith(tail)
    assert font.getlength(short) <= 60
    assert fit_caption("shape142", font, 1, "query: ") == "s…2"


# --------------------------------------------------------------------------------------- an offline W&B run, end to end
def test_wandb_offline_run_without_account(tmp_path, data_dir):
    """`python train.py logger=many` with no account: CSV, TensorBoard and an offline W&B run with everything."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DATA_DIR")}
    env.update(
        HF_HUB_OFFLINE="1",
        NETRC=str(tmp_path / "no-netrc"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
    )
    args = [
        *TINY,
        "logger=many",
        "trainer.log_every_n_steps=1",
        # The tiny sets have 16 and 48 points: let UMAP draw them anyway, as it would a real validation set.
        "callbacks.visualization.umap_min_points=10",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # Files in the run folder, with or without W&B.
    for name in (
        "umap_epoch000.png",
        "retrieval_epoch000.png",
        "umap_test.png",
        "retrieval_test.png",
        "confusion_test.png",
    ):
        assert Image.open(run_dir / "plots" / name).size[0] > 100, name
    projection = read_csv(run_dir / "tables" / "projection_test.csv")
    assert len(projection) == 48 and {"index", "label", "path", "x", "y", "e0", "e15"} <= set(projection[0])
    retrieval = read_csv(run_dir / "tables" / "retrieval_test.csv")
    assert len(retrieval) == 8 * 5 and {r["correct"] for r in retrieval} <= {"True", "False"}
    assert draw_run_retrieval(run_dir / "tables" / "retrieval_test.csv").width > 100
    csv_header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    # One learning rate per optimizer parameter group, named after the part it trains.
    lrs = {"lr-AdamW/backbone", "lr-AdamW/head"}
    assert {"train/loss", "train/images_per_sec", *lrs, "val/recall@1", "test/map@r"} <= set(csv_header)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # The offline W&B run: media files, tables, and the records of the .wandb file.
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    files = offline_runs[0] / "files"
    for prefix in ("val", "test"):
        assert list((files / "media" / "images" / prefix).glob("umap_*.png")), prefix
        assert list((files / "media" / "images" / prefix).glob("retrieval_grid_*.png")), prefix
        # 12 classes (at most callbacks.visualization.confusion_max_classes): the neighbour confusion matrix too.
        assert list((files / "media" / "images" / prefix).glob("confusion_*.png")), prefix
        # Verification's DET / ROC picture: test evaluations only.
        assert bool(list((files / "media" / "images" / prefix).glob("verification_*.png"))) == (prefix == "test")
        table = json.loads(next((files / "media" / "table" / prefix).glob("projection_*.table.json")).read_text())
        assert {"label", "image", "x", "y", "e0", "e15"} <= set(table["columns"])
        assert len(table["data"]) == (16 if prefix == "val" else 48)
        table = json.loads(next((files / "media" / "table" / prefix).glob("retrieval_*.table.json")).read_text())
        assert {"query_image", "result_1", "result_5", "hits"} <= set(table["columns"]) and len(table["data"]) == 8

    # W&B's service process may still be writing the run file for a moment after train.py exits (artifact records
    # come last, and late on a busy machine): wait for the seven tables and the checkpoint.
    records = wait_for_records(next(offline_runs[0].glob("run-*.wandb")), expected_artifacts=8)
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert {"data", "backbone", "loss", "optimizer", "trainer", "seed"} <= config_keys  # the resolved config
    history_keys = {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    for key in (
        "train/loss",
        "train/images_per_sec",
        "lr-AdamW/backbone",
        "lr-AdamW/head",
        "val/recall@1",
        "val/map@r",
        "val/r_precision",
        "val/nmi",
        "test/recall@1",
        "test/fnmr@fmr=0.01",
        "untrained/recall@1",
    ):
        assert key in history_keys, key
    metrics = {r.metric.name: r.metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert metrics["val/recall@1"].summary.max  # sweeps rank runs by the best validation Recall@1
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    models = [a for a in artifacts if a.type == "model"]
    assert len(models) == 1 and "best" in models[0].aliases
    (entry,) = models[0].manifest.contents
    best = Path(json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"])
    assert entry.path == "model.ckpt" and entry.size == best.stat().st_size
    assert Path(entry.local_path).is_file()
    # Tables with images are uploaded as run_table artifacts; offline, their files are staged inside the run folder.
    tables = [a for a in artifacts if a.type == "run_table"]
    # val and test: the projection and retrieval tables, and (12 classes, at most 50) the confusion-matrix chart's;
    # the test evaluation's ROC chart.
    assert len(tables) == 7
    assert sum("confusion_matrix" in a.name for a in tables) == 2
    assert sum("roc" in a.name for a in tables) == 1
    for artifact in tables:
        for item in artifact.manifest.contents:
            assert Path(item.local_path).is_file() and str(run_dir) in item.local_path
