"""Index faults: an index searched with another model, damaged index files, and SIGKILL while an index is built.

Each is refused with one line that names the index (and the file) and gives the command that fixes it; the index
on disk is left as it was, and following the printed command works.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from metricsearch.cli.evaluate import main_evaluate
from metricsearch.cli.search import main_build_index, main_export, main_search
from metricsearch.inference.errors import ModelLoadError
from metricsearch.inference.model_loading import (
    load_backbone_embedder,
    load_embedder,
    load_embedder_from_source,
)
from metricsearch.inference.predict_embeddings import SHARDS_NAME
from metricsearch.models.model_config import allowed_model_targets
from metricsearch.search.errors import IndexLoadError, IndexMismatchError
from metricsearch.search.index import METADATA_NAME, GalleryIndex
from metricsearch.search.server import create_app
from metricsearch.utils.config import CONFIG_DIR
from tests.faults.snapshots import snapshot
from tests.helpers import REPO_ROOT
from tests.search_fixtures import TinySearchSetup, copy_index

QUERY = "005/001.jpg"


def error_line(capsys) -> str:
    """What a command printed on stderr, checked to be one error line without a traceback."""
    return error_line_of(capsys.readouterr().err)


def error_line_of(err: str) -> str:
    """``err`` checked to be one error line without a traceback."""
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def follow_rebuild_hint(message: str) -> int:
    """Runs the ``python scripts/build_index.py ...`` command that an error message gives, in-process."""
    match = re.search(r"python scripts/build_index\.py (\S+ gallery=\S+ out=\S+ overwrite=true)", message)
    assert match, f"no rebuild command in: {message}"
    return main_build_index([*shlex.split(match.group(1)), "num_workers=0"])


def ranked(index: GalleryIndex) -> tuple[np.ndarray, np.ndarray]:
    """Every gallery image's top 5 (positions and scores), the index's complete behaviour on its own images."""
    hits = index.search(index.embeddings, k=5)
    return np.array([[h.position for h in q] for q in hits]), np.array([[h.score for h in q] for q in hits])


def search_top(index_dir: Path, setup: TinySearchSetup, capsys, *extra: str) -> str:
    """The top result of searching ``QUERY`` with ``main_search`` (which must succeed)."""
    capsys.readouterr()  # what earlier commands printed
    assert (
        main_search([f"index={index_dir}", f"query={setup.gallery / QUERY}", "k=3", "grid=none", "--json", *extra]) == 0
    )
    return json.loads(capsys.readouterr().out)["results"][0]["path"]


# ---------------------------------------------------------------------------------------------------------------
# An index from another model


def test_an_index_searched_with_another_model_is_refused_and_the_fix_works(tiny, tmp_path, capsys):
    folder = copy_index(tiny, tmp_path / "index")
    before = snapshot(folder)
    query = tiny.gallery / QUERY
    assert main_search([f"index={folder}", f"query={query}", f"ckpt={tiny.other_ckpt}", "grid=none"]) == 2
    err = error_line(capsys)
    assert f"index={folder}: this index was built by another model" in err
    assert str(tiny.ckpt) in err and str(tiny.other_ckpt) in err
    assert f"python scripts/build_index.py ckpt={tiny.other_ckpt} gallery={tiny.gallery} out={folder}" in err
    # Growing it with the other model is refused the same way, before anything is embedded or written.
    assert main_build_index([f"out={folder}", "add=true", f"ckpt={tiny.other_ckpt}", "num_workers=0"]) == 2
    assert "built by another model" in error_line(capsys)
    with pytest.raises(IndexMismatchError, match="built by another model"):
        create_app(folder, ckpt=tiny.other_ckpt)
    assert snapshot(folder) == before
    assert search_top(folder, tiny, capsys) == QUERY  # still searchable with its own model

    assert follow_rebuild_hint(err) == 0
    capsys.readouterr()
    assert search_top(folder, tiny, capsys, f"ckpt={tiny.other_ckpt}") == QUERY
    assert main_search([f"index={folder}", f"query={query}", f"ckpt={tiny.ckpt}", "grid=none"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Damaged index files


def _data_file(folder: Path, kind: str) -> Path:
    meta = json.loads((folder / METADATA_NAME).read_text())
    return folder / meta[f"{kind}_file"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("kind", "damage", "reason"),
    [
        ("vectors", _truncate, r"it is [\d,]+ bytes, but [\d,]+ were written \(truncated\)"),
        ("embeddings", _truncate, r"it is [\d,]+ bytes, but [\d,]+ were written \(truncated\)"),
        ("embeddings", _flip_a_byte, r"its content differs from what was written \(SHA-256 mismatch"),
        ("vectors", Path.unlink, r"it is missing, although metadata\.json names it"),
    ],
    ids=["vectors-truncated", "embeddings-truncated", "embeddings-corrupted", "vectors-missing"],
)
def test_a_damaged_index_file_is_named_with_the_command_that_rebuilds_it(kind, damage, reason, tiny, tmp_path, capsys):
    folder = copy_index(tiny, tmp_path / "index")
    damaged = _data_file(folder, kind)
    damage(damaged)
    before = snapshot(folder)
    message = rf"index={re.escape(str(folder))}: the data file {re.escape(damaged.name)} cannot be used: {reason}"
    with pytest.raises(IndexLoadError, match=message) as info:
        GalleryIndex.load(folder)
    rebuild = f"python scripts/build_index.py ckpt={tiny.ckpt} gallery={tiny.gallery} out={folder} overwrite=true"
    assert rebuild in str(info.value)
    # The same one line from every tool that opens an index.
    assert main_search([f"index={folder}", f"query={tiny.gallery / QUERY}", "grid=none"]) == 2
    assert re.search(message, error_line(capsys))
    with pytest.raises(IndexLoadError, match=message):
        create_app(folder)
    assert snapshot(folder) == before, "opening a damaged index changed it"


def test_a_truncated_index_file_of_an_index_without_checksums_is_still_named(tiny, tmp_path):
    """Indexes saved before sizes and checksums were recorded: faiss's own error, wrapped with the file and the fix."""
    folder = copy_index(tiny, tmp_path / "index")
    meta = json.loads((folder / METADATA_NAME).read_text())
    del meta["files"]
    (folder / METADATA_NAME).write_text(json.dumps(meta))
    _truncate(folder / meta["vectors_file"])
    with pytest.raises(
        IndexLoadError, match=rf"the data file {meta['vectors_file']} cannot be used: faiss cannot read"
    ):
        GalleryIndex.load(folder)


def test_following_the_rebuild_command_repairs_a_truncated_index(tiny, tmp_path):
    folder = copy_index(tiny, tmp_path / "index")
    _truncate(_data_file(folder, "vectors"))
    with pytest.raises(IndexLoadError) as info:
        GalleryIndex.load(folder)
    assert follow_rebuild_hint(str(info.value)) == 0
    repaired, original = GalleryIndex.load(folder), GalleryIndex.load(tiny.index_dir)
    assert repaired.paths == original.paths
    np.testing.assert_allclose(repaired.embeddings, original.embeddings, atol=1e-6)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [METADATA_NAME, _data_file(folder, "vectors").name, _data_file(folder, "embeddings").name]
    )


def test_temp_files_of_a_save_killed_midway_are_never_read_and_are_cleared_by_the_next_save(tiny, tmp_path):
    folder = copy_index(tiny, tmp_path / "index")
    before = snapshot(folder)
    # A real writer killed inside atomic_path, half-way through a data file: the temporary file stays behind.
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from metricsearch.utils.atomic_io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half a faiss index')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n",
            str(folder / "vectors-20990101T000000-deadbeef.faiss"),
        ],
        cwd=REPO_ROOT,
    )
    assert killed.returncode == -signal.SIGKILL
    (orphan,) = (p for p in folder.iterdir() if p.name not in before)
    assert orphan.name.startswith(".vectors-") and ".tmp-" in orphan.name
    index = GalleryIndex.load(folder)
    assert len(index) == 96
    index.save(folder)
    assert not orphan.exists()
    assert len(GalleryIndex.load(folder)) == 96


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL while building an index


def big_gallery(setup: TinySearchSetup, root: Path, copies: int = 10) -> Path:
    """``copies`` hard-linked copies of the tiny gallery (960 images): seconds of embedding, no disk space."""
    for copy in range(copies):
        for image in setup.gallery.rglob("*.jpg"):
            target = root / f"r{copy:02d}" / image.parent.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(image, target)
    return root


def build_then_kill_while_embedding(setup: TinySearchSetup, gallery: Path, out: Path, log: Path, *extra: str) -> str:
    """Starts scripts/build_index.py, SIGKILLs it as soon as its first progress line arrives; returns that line.

    The output is read line by line from a pipe, so the signal follows the line at once (no polling interval): the
    first line comes after the first batch, and 960 images at 8 per batch leave 119 batches to go, so the build is
    still embedding when the signal lands however fast the machine (checked below, not assumed).
    """
    command = [
        sys.executable,
        "scripts/build_index.py",
        f"ckpt={setup.ckpt}",
        f"gallery={gallery}",
        f"out={out}",
        "num_workers=0",
        "batch_size=8",
        *extra,
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    progress = re.compile(r"Embedded (\d+)/(\d+) batches")
    watchdog = threading.Timer(240, process.kill)  # a build that hangs without output fails instead of blocking
    watchdog.start()
    found = None
    try:
        with open(log, "w") as output:
            for line in process.stdout:
                output.write(line)
                found = found or progress.search(line)
                if found and process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    output.write(process.stdout.read())
                    break
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
        process.wait()
    text = log.read_text(errors="replace")
    assert process.returncode == -signal.SIGKILL, f"the build ended by itself ({process.returncode}): {text[-2000:]}"
    assert found and int(found.group(1)) < int(found.group(2)), "killed after the embedding had finished"
    assert not re.search(r"index .*: \d+ images \(", text), "the build finished before the kill"
    return found.group(0)


def test_sigkill_while_rebuilding_keeps_the_previous_index(tiny, tmp_path, capsys):
    folder = copy_index(tiny, tmp_path / "index")
    before = snapshot(folder)
    previous = GalleryIndex.load(folder)
    positions, scores = ranked(previous)

    gallery = big_gallery(tiny, tmp_path / "big")
    build_then_kill_while_embedding(tiny, gallery, folder, tmp_path / "build.log", "overwrite=true")

    left = snapshot(folder)
    assert {name: digest for name, digest in left.items() if name in before} == before, "the previous index changed"
    assert set(left) - set(before) <= {SHARDS_NAME}, f"partial files were left: {set(left) - set(before)}"
    survivor = GalleryIndex.load(folder)
    assert survivor.paths == previous.paths
    survivor_positions, survivor_scores = ranked(survivor)
    np.testing.assert_array_equal(survivor_positions, positions)
    np.testing.assert_array_equal(survivor_scores, scores)
    assert search_top(folder, tiny, capsys) == QUERY

    # Building again afterwards works and leaves nothing of the killed build behind.
    assert (
        main_build_index(
            [f"ckpt={tiny.ckpt}", f"gallery={tiny.gallery}", f"out={folder}", "overwrite=true", "num_workers=0"]
        )
        == 0
    )
    rebuilt = GalleryIndex.load(folder)
    np.testing.assert_allclose(rebuilt.embeddings, previous.embeddings, atol=1e-6)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [METADATA_NAME, _data_file(folder, "vectors").name, _data_file(folder, "embeddings").name]
    )


def test_sigkill_during_the_first_build_leaves_a_folder_that_says_it_is_unfinished(tiny, tmp_path, capsys):
    folder = tmp_path / "index"
    gallery = big_gallery(tiny, tmp_path / "big")
    build_then_kill_while_embedding(tiny, gallery, folder, tmp_path / "build.log")

    unfinished = rf"index={re.escape(str(folder))} has no metadata\.json \(no finished index\): a build was interrupted"
    with pytest.raises(IndexLoadError, match=unfinished):
        GalleryIndex.load(folder)
    assert main_search([f"index={folder}", f"query={tiny.gallery / QUERY}", "grid=none"]) == 2
    assert re.search(unfinished, error_line(capsys))
    # Building into it again works: the remains neither block the build nor leak into the new index.
    assert main_build_index([f"ckpt={tiny.ckpt}", f"gallery={tiny.gallery}", f"out={folder}", "num_workers=0"]) == 0
    index = GalleryIndex.load(folder)
    assert len(index) == 96 and not (folder / SHARDS_NAME).exists()
    assert search_top(folder, tiny, capsys) == QUERY


# ---------------------------------------------------------------------------------------------------------------
# An index is data: a malformed or hostile metadata.json is refused, never obeyed


def _rewrite_metadata(folder: Path, change) -> None:
    meta = json.loads((folder / METADATA_NAME).read_text())
    changed = change(meta)
    (folder / METADATA_NAME).write_text(json.dumps(meta if changed is None else changed))


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


def _delete(*keys):
    def change(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return change


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda meta: [meta], "it holds a list of 1 items, not an object"),
        (_delete("paths"), "the key paths is missing"),
        (_delete("model", "source"), "the key model.source is missing"),
        (_delete("index", "kind"), "the key index.kind is missing"),
        (_set("count", "96"), "count should be int, not '96'"),
        (_set("model", []), "model should be dict, not a list of 0 items"),
        (_set("paths", {"000/000.jpg": 1}), "paths should be list, not a dict of 1 items"),
        (_set("labels", 3, 5), "labels[3] should be a str or null, not 5"),
        (_set("embedding_dim", True), "embedding_dim should be int, not True"),
        (_set("index", "kind", "annoy"), "index.kind should be one of flat, ivf, hnsw, not 'annoy'"),
        (_set("model", "fingerprint", "f" * 5_000_000), "model.fingerprint should be 64 hexadecimal digits, not 'ff"),
        (_set("gallery_root", _nested(500)), "gallery_root should be str, not a list of 1 items"),
        (_set("vectors_file", "../../../etc/passwd"), "vectors_file should name a data file of the index folder"),
        (_set("paths", 0, "../../outside.jpg"), "paths[0] should be a relative path inside the gallery root"),
        (_set("paths", 1, "000/000.jpg"), "a gallery path is listed twice"),
        (_set("count", 95), "count is 95 but there are 96 paths and 96 labels"),
    ],
    ids=[
        "a-list",
        "no-paths",
        "no-model-source",
        "no-index-kind",
        "count-a-string",
        "model-a-list",
        "paths-a-dict",
        "label-a-number",
        "dim-a-bool",
        "unknown-kind",
        "huge-fingerprint",
        "deeply-nested-root",
        "vectors-file-elsewhere",
        "path-climbing-out",
        "duplicate-path",
        "count-disagrees",
    ],
)
def test_a_malformed_metadata_file_is_one_damaged_index_line(change, problem, tiny, tmp_path, capsys):
    folder = copy_index(tiny, tmp_path / "index")
    _rewrite_metadata(folder, change)
    before = snapshot(folder)
    damaged = f"index={folder}: {METADATA_NAME} is damaged or was not written by MetricSearch ("
    with pytest.raises(IndexLoadError) as info:
        GalleryIndex.load(folder)
    message = str(info.value)
    assert message.startswith(damaged) and problem in message, message
    assert "\n" not in message and len(message) < 1000, f"{len(message)} characters"
    assert "python scripts/build_index.py" in message
    assert main_search([f"index={folder}", f"query={tiny.gallery / QUERY}", "grid=none"]) == 2
    assert error_line(capsys) == f"error: {message}"
    with pytest.raises(IndexLoadError, match=re.escape(problem)):
        create_app(folder)
    assert snapshot(folder) == before


def test_metadata_nested_too_deeply_for_the_json_parser_is_one_line(tiny, tmp_path, capsys):
    folder = copy_index(tiny, tmp_path / "index")
    text = (folder / METADATA_NAME).read_text()
    (folder / METADATA_NAME).write_text(
        text.replace('"labels":', '"extra": ' + "[" * 100_000 + "]" * 100_000 + ', "labels":')
    )
    assert main_search([f"index={folder}", f"query={tiny.gallery / QUERY}", "grid=none"]) == 2
    assert "is not valid JSON (it nests too deeply)" in error_line(capsys)


def _evil_backbone(tmp_path: Path, marker: str) -> Path:
    """A backbone config outside the project whose _target_ runs code: what a hostile index would point at."""
    evil = tmp_path / "elsewhere" / "evil.yaml"
    evil.parent.mkdir(parents=True)
    evil.write_text(f"_target_: builtins.print\n_args_: [{marker}]\n")
    return evil


def test_an_index_naming_a_backbone_outside_conf_backbone_runs_nothing(tiny, tmp_path, capsys):
    """The probe's index: model.source.path climbs out of conf/backbone to a config whose _target_ prints."""
    evil = _evil_backbone(tmp_path, "PWNED-BY-INDEX")
    climbing = os.path.relpath(evil.with_suffix(""), CONFIG_DIR / "backbone")
    assert climbing.startswith("..")
    folder = copy_index(tiny, tmp_path / "index")
    _rewrite_metadata(folder, _set("model", "source", {"kind": "backbone", "path": climbing}))
    capsys.readouterr()
    assert main_search([f"index={folder}", f"query={tiny.gallery / QUERY}", "grid=none"]) == 2
    captured = capsys.readouterr()
    assert "PWNED" not in captured.out + captured.err
    err = captured.err.strip()
    assert err.startswith(f"error: index={folder}: the index records the backbone") and "\n" not in err
    options = ", ".join(sorted(path.stem for path in (CONFIG_DIR / "backbone").glob("*.yaml")))
    assert f"is not an option of conf/backbone ({options})" in err
    assert "damaged or not to be trusted" in err


@pytest.mark.parametrize("name", ["../backbone/resnet10t", "resnet10t/../resnet10t", "/etc/passwd", "resnet10t.yaml"])
def test_a_backbone_is_named_never_given_as_a_path(name):
    with pytest.raises(ModelLoadError, match="is not an option of conf/backbone"):
        load_backbone_embedder(name)
    with pytest.raises(ModelLoadError, match="is not an option of conf/backbone"):
        load_embedder_from_source({"kind": "backbone", "path": name})


def _hostile_checkpoint(tiny: TinySearchSetup, path: Path, change) -> Path:
    checkpoint = torch.load(tiny.ckpt, map_location="cpu", weights_only=True)
    change(checkpoint["hyper_parameters"]["model_config"])
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (
            lambda config: config.update(backbone={"_target_": "builtins.print", "_args_": ["PWNED-BY-CKPT"]}),
            "asks to instantiate 'builtins.print' (model_config.backbone)",
        ),
        (
            lambda config: config["head"].update(extra={"_target_": "builtins.print", "_args_": ["PWNED-BY-CKPT"]}),
            "asks to instantiate 'builtins.print' (model_config.head.extra)",
        ),
        (
            lambda config: config["backbone"].update(_target_="metricsearch.models.backbone.os.system"),
            "asks to instantiate 'metricsearch.models.backbone.os.system'",
        ),
        (
            lambda config: config["backbone"].update(model_name="${oc.env:HOME}"),
            "holds an interpolation '${oc.env:HOME}' (model_config.backbone.model_name)",
        ),
    ],
    ids=["print-backbone", "nested-target", "module-attribute", "interpolation"],
)
def test_a_checkpoint_or_index_model_config_instantiates_only_the_projects_model_parts(
    change, refused, tiny, tmp_path, capsys
):
    ckpt = _hostile_checkpoint(tiny, tmp_path / "hostile.ckpt", change)
    capsys.readouterr()
    with pytest.raises(ModelLoadError, match=re.escape(refused)) as info:
        load_embedder(ckpt=ckpt)
    assert "damaged or not to be trusted" in str(info.value)
    # An index that names the checkpoint is refused the same way when it is opened.
    folder = copy_index(tiny, tmp_path / "index")
    _rewrite_metadata(folder, _set("model", "source", {"kind": "checkpoint", "path": str(ckpt)}))
    assert main_search([f"index={folder}", f"query={tiny.gallery / QUERY}", "grid=none"]) == 2
    captured = capsys.readouterr()
    assert "PWNED" not in captured.out + captured.err
    assert refused in error_line_of(captured.err)


def test_the_projects_own_model_parts_are_allowed():
    allowed = allowed_model_targets()
    assert {
        "metricsearch.models.backbone.TimmBackbone",
        "metricsearch.models.pretrained.efficientnet_lite0_imagenet",
        "metricsearch.models.head.EmbeddingHead",
        "metricsearch.models.pretrained.NormalizeHead",
    } <= allowed
    assert not any(target.startswith(("builtins", "os", "subprocess")) for target in allowed)


# ---------------------------------------------------------------------------------------------------------------
# A file that is no checkpoint, given as ckpt= to the tools that load a model


@pytest.mark.parametrize("tool", ["evaluate", "search", "export"])
def test_a_text_file_given_as_ckpt_is_one_line(tool, tiny, tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello world\n")
    run, args = {
        "evaluate": (main_evaluate, [f"data.root={tiny.gallery}"]),
        "search": (main_search, [f"index={tiny.index_dir}", f"query={tiny.gallery / QUERY}", "grid=none"]),
        "export": (main_export, [f"out={tmp_path / 'model.onnx'}"]),
    }[tool]
    capsys.readouterr()
    assert run([f"ckpt={text}", *args]) == 2
    assert error_line(capsys) == (
        f"error: ckpt={text} cannot be read: it is not a PyTorch checkpoint: torch.save writes a zip archive, and "
        "this file is not one; pass a checkpoint that training wrote (a run's checkpoints/*.ckpt)"
    )
    assert not (tmp_path / "model.onnx").exists()
