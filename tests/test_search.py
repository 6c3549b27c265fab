"""Gallery indexing and search: embedders, the index on disk, adding images, model checks, the command lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import metricsearch.pipelines.index as pipeline_module
from metricsearch.cli.search import main_build_index, main_search
from metricsearch.inference.errors import ModelLoadError
from metricsearch.inference.model_loading import fingerprint_weights, load_embedder
from metricsearch.inference.predict_embeddings import make_predict_trainer
from metricsearch.pipelines.index import add_to_index, build_index, search_files
from metricsearch.search.errors import (
    IndexLoadError,
    IndexMismatchError,
    RequestError,
    SearchError,
    check_k,
)
from metricsearch.search.gallery import list_gallery_images
from metricsearch.search.index import METADATA_NAME, GalleryIndex, IndexSpec, open_index
from tests.helpers import REPO_ROOT
from tests.search_fixtures import copy_index


def quiet_trainer():
    return make_predict_trainer(progress_bar=False)


# ----------------------------------------------------------------------------------------------------------------
# Gallery folders


def test_gallery_listing_labels_by_folder_and_skips_hidden_and_non_images(tmp_path):
    for rel in ["cats/a.jpg", "cats/b.PNG", "dogs/c.webp", "top.jpg", ".hidden/d.jpg", "cats/._e.jpg", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    paths, labels = list_gallery_images(tmp_path)
    assert paths == ["cats/a.jpg", "cats/b.PNG", "dogs/c.webp", "top.jpg"]
    assert labels == ["cats", "cats", "dogs", None]


def test_links_that_lead_out_of_the_gallery_are_not_listed_or_indexed(tiny, tmp_path, caplog):
    """The server refuses every file outside the gallery root, so such a file must not be indexed either."""
    gallery, elsewhere = tmp_path / "gallery", tmp_path / "elsewhere"
    shutil.copytree(tiny.gallery / "000", gallery / "000")
    elsewhere.mkdir()
    shutil.copy(tiny.gallery / "001" / "000.jpg", elsewhere / "secret.jpg")
    (gallery / "000" / "outside.jpg").symlink_to(elsewhere / "secret.jpg")
    (gallery / "000" / "inside.jpg").symlink_to(gallery / "000" / "001.jpg")  # a link within the gallery is fine
    paths, _ = list_gallery_images(gallery)
    assert "000/outside.jpg" not in paths and "000/inside.jpg" in paths and len(paths) == 9
    assert "lead outside the gallery" in caplog.text and "000/outside.jpg" in caplog.text
    # Paths given explicitly are held to the same rule.
    index = build_index(
        load_embedder(ckpt=tiny.ckpt),
        gallery,
        tmp_path / "index",
        paths=["000/000.jpg", "000/outside.jpg", "000/inside.jpg"],
        trainer=quiet_trainer(),
    )
    assert index.paths == ["000/000.jpg", "000/inside.jpg"] and index.labels == ["000", "000"]


def test_gallery_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(SearchError, match="holds no image files"):
        list_gallery_images(tmp_path)
    with pytest.raises(SearchError, match="is not a folder"):
        list_gallery_images(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------
# Embedders


def test_checkpoint_embedder_rebuilds_the_trained_model(tiny, embedder):
    checkpoint = torch.load(tiny.ckpt, map_location="cpu", weights_only=True)
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    for name, tensor in embedder.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    assert embedder.embedding_dim == 16
    assert embedder.preprocessing == {
        "image_size": 32,
        "resize_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert not embedder.model.training
    out = embedder.embed_tensor(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_fingerprint_depends_on_weights_and_preprocessing_only(tiny, embedder):
    other = load_embedder(ckpt=tiny.other_ckpt)
    assert other.fingerprint != embedder.fingerprint
    state = embedder.model.state_dict()
    assert fingerprint_weights(state, embedder.preprocessing) == embedder.fingerprint
    assert fingerprint_weights(state, {**embedder.preprocessing, "image_size": 64}) != embedder.fingerprint
    changed = {k: v.clone() for k, v in state.items()}
    name = next(k for k in changed if k.endswith("weight"))
    changed[name].view(-1)[0] += 1e-3
    assert fingerprint_weights(changed, embedder.preprocessing) != embedder.fingerprint


def test_checkpoint_whose_weights_do_not_fit_its_model_is_refused(tiny, tmp_path):
    checkpoint = torch.load(tiny.ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["model_config"]["backbone"]["model_name"] = "resnet18"
    torch.save(checkpoint, tmp_path / "mixed.ckpt")
    with pytest.raises(ModelLoadError, match=r"does not fit the model its config describes \(resnet18"):
        load_embedder(ckpt=tmp_path / "mixed.ckpt")


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="cannot be read: it is not a PyTorch checkpoint"):
        load_embedder(ckpt=tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ModelLoadError, match="no hyper_parameters.model_config"):
        load_embedder(ckpt=tmp_path / "foreign.ckpt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_embedder(ckpt=tmp_path / "missing.ckpt")
    with pytest.raises(ModelLoadError, match="exactly one of"):
        load_embedder()


# ----------------------------------------------------------------------------------------------------------------
# The index


def test_built_index_finds_each_gallery_image_first_and_records_its_metadata(tiny, embedder):
    index = GalleryIndex.load(tiny.index_dir)
    paths, labels = list_gallery_images(tiny.gallery)
    assert index.paths == paths and index.labels == labels and len(index) == 96
    hits = search_files(index, embedder, [tiny.gallery / "003" / "004.jpg"], k=5)[0]
    assert hits[0].path == "003/004.jpg" and hits[0].label == "003" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))

    meta = json.loads((tiny.index_dir / METADATA_NAME).read_text())
    assert meta["embedding_dim"] == 16 and meta["count"] == 96 and meta["index"] == {"kind": "flat"}
    assert meta["model"]["fingerprint"] == embedder.fingerprint
    assert meta["model"]["source"]["kind"] == "checkpoint"
    assert len(meta["model"]["source"]["sha256"]) == 64
    assert meta["model"]["preprocessing"]["image_size"] == 32
    assert meta["paths"][0] == "000/000.jpg" and meta["labels"][0] == "000"
    assert meta["gallery_root"] == str(tiny.gallery.resolve())


def test_flat_search_equals_a_brute_force_reference(tiny):
    index = GalleryIndex.load(tiny.index_dir)
    queries = index.embeddings[[0, 17, 50]]
    for query, hits in zip(queries, index.search(queries, k=7), strict=True):
        similarity = index.embeddings.astype(np.float64) @ query.astype(np.float64)
        expected = np.argsort(-similarity, kind="stable")[:7]
        assert [h.position for h in hits] == expected.tolist()
        assert np.allclose([h.score for h in hits], similarity[expected], atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_agree_with_exact_search(tiny, kind, tmp_path):
    index = GalleryIndex.load(tiny.index_dir)
    exact = [[h.position for h in hits] for hits in index.search(index.embeddings, k=5)]
    index.rebuild(IndexSpec(kind=kind, nlist=8, nprobe=8))
    folder = index.save(tmp_path / kind)
    reloaded = GalleryIndex.load(folder)
    assert reloaded.index_params["kind"] == kind
    if kind == "ivf":  # a tiny gallery gets fewer cells than asked for; every cell is probed here
        assert reloaded.index_params["nlist"] == 2 and reloaded.index_params["nprobe"] == 2
    approx = [[h.position for h in hits] for hits in reloaded.search(reloaded.embeddings, k=5)]
    overlap = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx, exact, strict=True)])
    assert overlap > 0.95


def test_k_larger_than_the_gallery_returns_every_image(tiny):
    index = GalleryIndex.load(tiny.index_dir)
    assert len(index.search(index.embeddings[:1], k=1000)[0]) == len(index)


def test_adding_images_embeds_only_the_new_ones(tiny, tmp_path, monkeypatch):
    gallery = tmp_path / "gallery"
    for label in ("000", "001", "002"):
        shutil.copytree(tiny.gallery / label, gallery / label)
    embedder = load_embedder(ckpt=tiny.ckpt)
    first = build_index(embedder, gallery, tmp_path / "index", trainer=quiet_trainer())
    old = first.embeddings.copy()
    shutil.copytree(tiny.gallery / "003", gallery / "003")

    embedded: list[Path] = []
    original = pipeline_module.embed_files

    def spy(embedder, paths, *args, **kwargs):
        embedded.extend(paths)
        return original(embedder, paths, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "embed_files", spy)
    grown = add_to_index(tmp_path / "index", trainer=quiet_trainer())
    assert sorted(Path(p).relative_to(gallery).as_posix() for p in embedded) == [f"003/{i:03d}.jpg" for i in range(8)]
    reloaded = GalleryIndex.load(tmp_path / "index")
    assert len(grown) == len(reloaded) == 32
    np.testing.assert_array_equal(reloaded.embeddings[:24], old)
    # Added images are searchable and embedded as a full build would embed them.
    reference = GalleryIndex.load(tiny.index_dir)
    position = reference.position_of("003/002.jpg")
    hits = reloaded.search(reference.embeddings[position][None], k=1)[0]
    assert hits[0].path == "003/002.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    # Nothing new: nothing embedded, nothing changed.
    embedded.clear()
    add_to_index(tmp_path / "index", trainer=quiet_trainer())
    assert embedded == []


def test_adding_with_another_model_is_refused(tiny, tmp_path):
    folder = copy_index(tiny, tmp_path / "index")
    with pytest.raises(IndexMismatchError, match="built by another model"):
        add_to_index(folder, embedder=load_embedder(ckpt=tiny.other_ckpt), trainer=quiet_trainer())


def test_unreadable_gallery_files_are_left_out_with_a_warning(tiny, tmp_path, caplog):
    gallery = tmp_path / "gallery"
    shutil.copytree(tiny.gallery / "000", gallery / "000")
    (gallery / "000" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    index = build_index(load_embedder(ckpt=tiny.ckpt), gallery, tmp_path / "index", trainer=quiet_trainer())
    assert len(index) == 8 and "000/broken.jpg" not in index
    assert "broken.jpg" in caplog.text


def test_existing_index_is_not_overwritten_by_accident(tiny, embedder, tmp_path):
    folder = copy_index(tiny, tmp_path / "index")
    with pytest.raises(SearchError, match="already holds an index"):
        build_index(embedder, tiny.gallery, folder, trainer=quiet_trainer())


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


def test_a_crash_while_saving_leaves_the_previous_index_intact(tiny, tmp_path, monkeypatch):
    import metricsearch.search.index as index_module

    folder = copy_index(tiny, tmp_path / "index")
    before = sorted(p.name for p in folder.iterdir())
    index = GalleryIndex.load(folder)
    index.add(index.embeddings[:2] * 0.5, ["new/a.jpg", "new/b.jpg"], ["new", "new"])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module.np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        index.save(folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == before  # no new file left behind, no old one touched
    reloaded = GalleryIndex.load(folder)
    assert len(reloaded) == 96 and "new/a.jpg" not in reloaded


def test_a_folder_without_metadata_is_an_unfinished_index(tiny, tmp_path):
    folder = copy_index(tiny, tmp_path / "index")
    (folder / METADATA_NAME).unlink()
    with pytest.raises(IndexLoadError, match="no finished index"):
        GalleryIndex.load(folder)
    with pytest.raises(IndexLoadError, match="is not a folder"):
        GalleryIndex.load(tmp_path / "nowhere")


def test_saving_again_replaces_the_data_files(tiny, tmp_path):
    folder = copy_index(tiny, tmp_path / "index")
    index = GalleryIndex.load(folder)
    index.add(index.embeddings[:1], ["extra.jpg"], [None])
    index.save(folder)
    assert len(list(folder.glob("vectors-*.faiss"))) == 1 and len(list(folder.glob("embeddings-*.npy"))) == 1
    assert not list(folder.glob(".*tmp*"))
    assert len(GalleryIndex.load(folder)) == 97


# ----------------------------------------------------------------------------------------------------------------
# Model checks at search time


def test_an_index_refuses_another_model_of_the_same_size(tiny):
    with pytest.raises(IndexMismatchError, match="built by another model") as info:
        open_index(tiny.index_dir, ckpt=tiny.other_ckpt)
    assert str(tiny.ckpt.resolve()) in str(info.value) and str(tiny.other_ckpt.resolve()) in str(info.value)


def test_an_index_refuses_another_embedding_size(tiny):
    with pytest.raises(IndexMismatchError, match="holds 16-d embeddings .* makes 8-d ones"):
        open_index(tiny.index_dir, ckpt=tiny.wide_ckpt)


def test_an_index_whose_model_moved_says_how_to_continue(tiny, tmp_path):
    folder = copy_index(tiny, tmp_path / "index")
    meta = json.loads((folder / METADATA_NAME).read_text())
    meta["model"]["source"]["path"] = str(tmp_path / "gone.ckpt")
    (folder / METADATA_NAME).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="is not there any more: pass ckpt= or model="):
        open_index(folder)
    index, _ = open_index(folder, ckpt=tiny.ckpt)  # the same weights from another file are fine
    assert len(index) == 96


# ----------------------------------------------------------------------------------------------------------------
# Command lines


def test_build_index_and_search_command_lines(tiny, tmp_path, capsys):
    out = tmp_path / "index"
    assert (
        main_build_index([f"ckpt={tiny.ckpt}", f"gallery={tiny.gallery}", f"out={out}", "num_workers=0", "kind=hnsw"])
        == 0
    )
    assert "96 images (96 labelled), 16-d, hnsw index" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    query = tiny.gallery / "005" / "001.jpg"
    assert main_search([f"index={out}", f"query={query}", "k=3", f"grid={grid}", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in document["results"]] == [1, 2, 3]
    assert document["results"][0]["path"] == "005/001.jpg" and document["results"][0]["label"] == "005"
    assert document["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert document["grid"] == str(grid) and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main_search([f"index={out}", f"query={query}", "k=2", "grid=none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["1", "1.0000", str(query)]


def test_command_line_errors_are_one_clear_line(tiny, capsys):
    assert main_search([f"index={tiny.index_dir}", "qurey=x.jpg"]) == 2
    assert "unknown option 'qurey'" in capsys.readouterr().err
    assert main_search([f"index={tiny.index_dir}", f"query={tiny.gallery}/000/000.jpg", f"ckpt={tiny.wide_ckpt}"]) == 2
    assert "holds 16-d embeddings" in capsys.readouterr().err
    assert main_build_index(["out=/tmp/x", "k=3"]) == 2
    assert main_search(["k=3"]) == 2
    assert "needs index=, query=" in capsys.readouterr().err


@pytest.mark.parametrize("k", ["0", "-1", "101"])
def test_search_refuses_a_k_out_of_bounds_with_the_servers_rule(tiny, k, capsys):
    """search.py used to answer k=0 and k=-1 with one result (reporting "k": -1); the server refused both."""
    query = tiny.gallery / "000" / "000.jpg"
    assert main_search([f"index={tiny.index_dir}", f"query={query}", f"k={k}", "grid=none", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[0] == f"error: k must be between 1 and 100, got {k}"
    # The server's rule (tests/test_server.py checks its answer says exactly the same).
    with pytest.raises(RequestError) as refused:
        check_k(int(k))
    assert str(refused.value) == f"k must be between 1 and 100, got {k}"
    if int(k) < 1:  # nor does the library turn k < 1 into 1 any more
        with pytest.raises(RequestError, match="k must be at least 1"):
            GalleryIndex.load(tiny.index_dir).search(np.zeros((1, 16), np.float32), int(k))


def test_scripts_are_wired_to_the_package():
    for script in ("build_index", "search", "serve", "export", "bench_search", "demo", "load_test"):
        result = subprocess.run(
            [sys.executable, f"scripts/{script}.py", "--help"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: python scripts/{script}.py")


@pytest.mark.slow
def test_trained_checkpoint_end_to_end(tmp_path):
    """train.py debug=fast -> build_index.py -> search.py, as a user runs them."""
    env_run = dict(cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    run = subprocess.run(
        [
            sys.executable,
            "train.py",
            "debug=fast",
            f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "test_untrained=false",
        ],
        **env_run,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    gallery = next((tmp_path / "data").glob("synthetic-*")) / "images"
    build = subprocess.run(
        [
            sys.executable,
            "scripts/build_index.py",
            f"ckpt={ckpt}",
            f"gallery={gallery}",
            f"out={tmp_path / 'index'}",
            "num_workers=0",
        ],
        **env_run,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    search = subprocess.run(
        [
            sys.executable,
            "scripts/search.py",
            f"index={tmp_path / 'index'}",
            f"query={gallery / '002' / '003.jpg'}",
            "k=4",
            "--json",
            f"grid={tmp_path / 'grid.png'}",
        ],
        **env_run,
    )
    assert search.returncode == 0, search.stderr[-2000:]
    assert json.loads(search.stdout)["results"][0]["path"] == "002/003.jpg"


@pytest.mark.slow
@pytest.mark.ddp
def test_sharded_embedding_across_two_processes_matches_one(tiny, tmp_path):
    embedder = load_embedder(ckpt=tiny.ckpt)
    trainer = make_predict_trainer(progress_bar=False, accelerator="cpu", devices=2, strategy="ddp_spawn")
    index = build_index(embedder, tiny.gallery, tmp_path / "index", trainer=trainer)
    reference = GalleryIndex.load(tiny.index_dir)
    assert index.paths == reference.paths
    np.testing.assert_allclose(index.embeddings, reference.embeddings, atol=1e-5)
    assert not (tmp_path / "index" / ".embedding-shards").exists()
