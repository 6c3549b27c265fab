"""The two index backends: faiss files in the index folder and a Milvus collection (real Milvus Lite, no mock).

Both give the same exact results on the same gallery, record the same metadata, refuse another model, change
in place (add, remove by path or id), filter by class or folder exactly, and survive a writer killed mid-add.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metricsearch.cli.search import main_build_index, main_search
from metricsearch.inference.model_loading import load_embedder
from metricsearch.inference.predict_embeddings import make_predict_trainer
from metricsearch.pipelines.index import add_to_index, build_index, remove_from_index
from metricsearch.search.backends import filtered_search, load_gallery_index
from metricsearch.search.errors import IndexLoadError, IndexMismatchError, RequestError, SearchError
from metricsearch.search.filters import SearchFilter, milvus_expression, quote_literal
from metricsearch.search.index import METADATA_NAME, GalleryIndex, open_index
from metricsearch.search.milvus_index import MilvusGalleryIndex, build_milvus_index, release
from tests.helpers import REPO_ROOT
from tests.search_fixtures import copy_index

pytestmark = pytest.mark.usefixtures("release_milvus")


def milvus_copy(faiss_index: GalleryIndex, embedder, folder: Path, labels=None) -> MilvusGalleryIndex:
    """A Milvus index of the same embeddings, paths and labels as ``faiss_index``."""
    return build_milvus_index(
        faiss_index.embeddings,
        list(faiss_index.paths),
        list(labels if labels is not None else faiss_index.labels),
        embedder,
        faiss_index.gallery_root,
        folder,
    )


def brute_force(embeddings: np.ndarray, query: np.ndarray, allowed: np.ndarray, k: int) -> list[int]:
    """Rows of the ``k`` best allowed embeddings for ``query`` (float64 scores, one by one)."""
    scores = np.array([float(np.dot(e.astype(np.float64), query.astype(np.float64))) for e in embeddings])
    scores[~allowed] = -np.inf
    order = np.argsort(-scores, kind="stable")
    return [int(r) for r in order[: min(k, int(allowed.sum()))]]


def ranking(hits) -> list[str]:
    return [h.path for h in hits]


def test_both_backends_give_the_same_exact_results_and_metadata(tiny, embedder, faiss_index, tmp_path):
    built = milvus_copy(faiss_index, embedder, tmp_path / "milvus")
    milvus = load_gallery_index(tmp_path / "milvus")
    assert isinstance(milvus, MilvusGalleryIndex) and milvus.backend == "milvus"
    assert milvus.paths == faiss_index.paths == built.paths and milvus.labels == faiss_index.labels
    assert milvus.ids == list(range(96))
    queries = faiss_index.embeddings
    for expected, found in zip(faiss_index.search(queries, 10), milvus.search(queries, 10), strict=True):
        assert ranking(found) == ranking(expected)
        assert np.allclose([h.score for h in found], [h.score for h in expected], atol=1e-5)
        assert [h.label for h in found] == [h.label for h in expected]
        assert [h.id for h in found] == [h.id for h in expected]
    # The same description of the index: model identity, gallery root, kind, count.
    faiss_meta = json.loads((tiny.index_dir / METADATA_NAME).read_text())
    milvus_meta = json.loads((tmp_path / "milvus" / METADATA_NAME).read_text())
    for key in ("model", "gallery_root", "index", "count", "embedding_dim", "format", "version"):
        assert milvus_meta[key] == faiss_meta[key], key
    assert milvus_meta["backend"] == "milvus" and milvus_meta["uri"] == str(tmp_path / "milvus" / "gallery.db")
    assert np.allclose(milvus.embedding_of("005/001.jpg"), faiss_index.embedding_of("005/001.jpg"), atol=1e-7)


def test_a_milvus_index_refuses_another_model(tiny, embedder, faiss_index, tmp_path):
    milvus_copy(faiss_index, embedder, tmp_path / "milvus")
    index, chosen = open_index(tmp_path / "milvus")  # the model the index records
    assert chosen.fingerprint == embedder.fingerprint and isinstance(index, MilvusGalleryIndex)
    with pytest.raises(IndexMismatchError, match="built by another model") as refused:
        open_index(tmp_path / "milvus", ckpt=tiny.other_ckpt)
    # The command it gives rebuilds the index where it is, in Milvus.
    assert f"overwrite=true index.backend=milvus index.uri={tmp_path / 'milvus' / 'gallery.db'}" in str(refused.value)
    with pytest.raises(IndexMismatchError, match="16-d embeddings"):
        index.check_embedder(load_embedder(ckpt=tiny.wide_ckpt))


def test_the_metadata_of_a_milvus_index_is_checked(embedder, faiss_index, tmp_path):
    milvus_copy(faiss_index, embedder, tmp_path / "milvus")
    meta_path = tmp_path / "milvus" / METADATA_NAME
    meta = json.loads(meta_path.read_text())
    for key, value in (("collection", 'x" or 1'), ("next_id", -1), ("backend", "elastic"), ("uri", 3)):
        meta_path.write_text(json.dumps(meta | {key: value}))
        with pytest.raises(IndexLoadError, match=r"damaged|not written by MetricSearch"):
            load_gallery_index(tmp_path / "milvus")
    meta_path.write_text(json.dumps(meta | {"collection": "metricsearch_gone"}))
    with pytest.raises(IndexLoadError, match="does not exist"):
        load_gallery_index(tmp_path / "milvus")


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_a_gallery_changes_in_place_by_path_and_id(backend, tiny, embedder, faiss_index, tmp_path):
    folder = tmp_path / "index"
    first = 48
    if backend == "faiss":
        index = GalleryIndex.build(
            faiss_index.embeddings[:first],
            faiss_index.paths[:first],
            faiss_index.labels[:first],
            embedder,
            faiss_index.gallery_root,
        )
        index.save(folder)
    else:
        index = build_milvus_index(
            faiss_index.embeddings[:first],
            faiss_index.paths[:first],
            faiss_index.labels[:first],
            embedder,
            faiss_index.gallery_root,
            folder,
        )
    index = load_gallery_index(folder)
    index.add(faiss_index.embeddings[first:], faiss_index.paths[first:], faiss_index.labels[first:])
    if backend == "faiss":
        index.save(folder)
    index = load_gallery_index(folder)
    assert index.paths == faiss_index.paths and index.ids == list(range(96))
    with pytest.raises(SearchError, match="already indexed"):
        index.add(faiss_index.embeddings[:1], faiss_index.paths[:1], faiss_index.labels[:1])

    # Remove by path and by id; ids of the others stay, new images get new ids.
    _, removed = remove_from_index(folder, paths=["000/000.jpg", "007/003.jpg"], ids=[50])
    assert removed == ["000/000.jpg", faiss_index.paths[50], "007/003.jpg"]
    with pytest.raises(SearchError, match="holds no image"):
        remove_from_index(folder, paths=["000/000.jpg"])
    index = load_gallery_index(folder)
    kept = [i for i in range(96) if faiss_index.paths[i] not in removed]
    assert index.paths == [faiss_index.paths[i] for i in kept] and index.ids == kept
    queries = faiss_index.embeddings[[0, 50, 60, 95]]
    for query, hits in zip(queries, index.search(queries, 10), strict=True):
        expected = brute_force(faiss_index.embeddings[kept], query, np.ones(len(kept), bool), 10)
        assert ranking(hits) == [faiss_index.paths[kept[r]] for r in expected]
    index.add(faiss_index.embeddings[:1], ["000/000.jpg"], ["000"])
    assert index.ids[-1] == 96 and "000/000.jpg" in index


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_adding_the_gallerys_new_images_through_the_pipeline(backend, tiny, embedder, tmp_path):
    gallery = tmp_path / "gallery"
    for label in ("000", "001"):
        shutil.copytree(tiny.gallery / label, gallery / label)
    folder = tmp_path / "index"
    trainer = make_predict_trainer(progress_bar=False)
    build_index(embedder, gallery, folder, trainer=trainer, backend=backend)
    shutil.copytree(tiny.gallery / "002", gallery / "002")
    grown = add_to_index(folder, trainer=make_predict_trainer(progress_bar=False))
    assert len(grown) == 24 and len(load_gallery_index(folder)) == 24
    assert json.loads((folder / METADATA_NAME).read_text())["backend"] == backend


def _labels_with_hostile_values(faiss_index: GalleryIndex) -> list[str | None]:
    hostile = ['a"b', "c\\", 'x" or id >= 0 or label == "y', '\\" or 1==1 or "', "000' or '1'=='1", None]
    return [hostile[i % len(hostile)] if i % 2 else label for i, label in enumerate(faiss_index.labels)]


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_filtered_search_is_exact_and_returns_k_when_enough_match(backend, embedder, faiss_index, tmp_path):
    labels = _labels_with_hostile_values(faiss_index)
    if backend == "faiss":
        index = GalleryIndex.build(
            faiss_index.embeddings, faiss_index.paths, labels, embedder, faiss_index.gallery_root
        )
    else:
        index = milvus_copy(faiss_index, embedder, tmp_path / "milvus", labels=labels)
    filters = [SearchFilter(label=v) for v in {v for v in labels if v is not None}]
    filters += [SearchFilter(folder="003"), SearchFilter(folder="003/"), SearchFilter(label="c\\", folder="005")]
    filters += [SearchFilter(label="no such class"), SearchFilter(folder="00")]
    queries = faiss_index.embeddings[[1, 40, 77]]
    for where in filters:
        allowed = np.array([where.matches(p, lab) for p, lab in zip(index.paths, labels, strict=True)])
        for query, hits in zip(queries, index.search(queries, 10, where), strict=True):
            expected = brute_force(faiss_index.embeddings, query, allowed, 10)
            assert ranking(hits) == [index.paths[r] for r in expected], where
            assert len(hits) == min(10, int(allowed.sum()))


def test_faiss_post_filter_widens_until_k_match():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 8)).astype(np.float32)
    import faiss

    index = faiss.IndexFlatIP(8)
    index.add(vectors)
    allowed = np.zeros(2000, bool)
    allowed[rng.choice(2000, 12, replace=False)] = True  # rare: far fewer than the first round's candidates
    (found,) = filtered_search(index, vectors[:1], 10, allowed)
    assert [r for r, _ in found] == brute_force(vectors, vectors[0], allowed, 10)


def test_filter_values_are_validated_and_quoted():
    assert quote_literal('a"b\\') == '"a\\"b\\\\"'
    assert milvus_expression(SearchFilter(label='x" or 1==1', folder="a/b")) == (
        'label == "x\\" or 1==1" and ARRAY_CONTAINS(folders, "a/b")'
    )
    for bad in ({"folder": "../etc"}, {"folder": "/abs"}, {"folder": "a\\b"}, {"label": "a\nb"}, {"label": "x" * 2000}):
        with pytest.raises(RequestError):
            SearchFilter(**bad)
    assert SearchFilter.of("", None) is None


# The writer is killed between its insert and its commit of metadata.json, which is what our protocol must survive.
# It first closes Milvus Lite (which writes its own files from threads of the writer's process) so that the kill
# cannot land inside Milvus Lite's own file writes: Milvus Lite is not crash-safe there (once, under a load average
# of ~10, a kill at that moment left its files unreadable, "No data left in file"), a limit of the embedded engine
# that docs/search_backends.md states and no protocol above Milvus can remove.
def test_a_milvus_add_killed_before_its_commit_leaves_the_index_as_it_was(embedder, faiss_index, tmp_path):
    folder = tmp_path / "milvus"
    first = 48
    build_milvus_index(
        faiss_index.embeddings[:first],
        faiss_index.paths[:first],
        faiss_index.labels[:first],
        embedder,
        faiss_index.gallery_root,
        folder,
    )
    before = (folder / METADATA_NAME).read_text()
    release(str(folder / "gallery.db"))  # Milvus Lite: one process at a time
    # A real writer adding 48 images in batches of 16, killed after its first batch is in the collection.
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "import numpy as np\n"
            "from metricsearch.search import milvus_index\n"
            "from metricsearch.search.index import GalleryIndex\n"
            "src = GalleryIndex.load(sys.argv[2])\n"
            "index = milvus_index.MilvusGalleryIndex.load(sys.argv[1])\n"
            "milvus_index.INSERT_BATCH = 16\n"
            "insert = index.client.insert\n"
            "def insert_then_die(*args, **kwargs):\n"
            "    insert(*args, **kwargs)\n"
            "    milvus_index._flush(index.client, index.collection)\n"
            "    milvus_index.release(index.uri)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "index.client.insert = insert_then_die\n"
            "index.add(src.embeddings[48:], src.paths[48:], src.labels[48:])\n",
            str(folder),
            str(faiss_index.folder),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (folder / METADATA_NAME).read_text() == before
    index = load_gallery_index(folder)
    # The killed writer's rows are in the collection, but nothing shows them.
    leftovers = index.client.query(index.collection, filter=f"id >= {index.next_id}", output_fields=["count(*)"])
    assert leftovers[0]["count(*)"] == 16
    assert index.paths == faiss_index.paths[:first] and len(index) == first
    queries = faiss_index.embeddings[first : first + 16]  # exactly the images of the uncommitted batch
    for query, hits in zip(queries, index.search(queries, 10), strict=True):
        expected = brute_force(faiss_index.embeddings[:first], query, np.ones(first, bool), 10)
        assert ranking(hits) == [faiss_index.paths[r] for r in expected]
    # The next addition clears the leftovers and commits the whole batch.
    index.add(faiss_index.embeddings[first:], faiss_index.paths[first:], faiss_index.labels[first:])
    reloaded = load_gallery_index(folder)
    assert reloaded.paths == faiss_index.paths
    total = reloaded.client.query(reloaded.collection, filter="id >= 0", output_fields=["count(*)"])
    assert total[0]["count(*)"] == 96


def test_a_faiss_add_killed_before_its_commit_leaves_the_index_as_it_was(tiny, tmp_path):
    folder = copy_index(tiny, tmp_path / "index")
    before = (folder / METADATA_NAME).read_text()
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from metricsearch.search import index as module\n"
            "def die(*args, **kwargs):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "module.atomic_write_text = die\n"
            "index = module.GalleryIndex.load(sys.argv[1])\n"
            "index.add(index.embeddings[:4] * 0.5, ['new/a.jpg', 'new/b.jpg', 'new/c.jpg', 'new/d.jpg'], [None] * 4)\n"
            "index.save(sys.argv[1])\n",
            str(folder),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (folder / METADATA_NAME).read_text() == before
    assert len(GalleryIndex.load(folder)) == 96


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_the_server_answers_from_either_backend_and_shows_the_current_gallery(backend, tiny, tmp_path):
    from fastapi.testclient import TestClient

    from metricsearch.search.server import create_app

    folder = tmp_path / "index"
    args = [f"ckpt={tiny.ckpt}", f"gallery={tiny.gallery}", f"out={folder}", f"index.backend={backend}"]
    assert main_build_index([*args, "num_workers=0"]) == 0
    with TestClient(create_app(folder)) as client:
        info = client.get("/api/info").json()
        assert info["backend"] == backend and info["count"] == 96
        answer = client.post("/api/search", data={"path": "005/001.jpg", "k": "5"}).json()
        assert answer["results"][0]["path"] == "005/001.jpg" and answer["results"][0]["score"] == pytest.approx(1)
        only = client.post("/api/search", data={"path": "005/001.jpg", "k": "5", "label": "007"}).json()
        assert [h["label"] for h in only["results"]] == ["007"] * 5
        hostile = client.post("/api/search", data={"path": "005/001.jpg", "label": '007" or id >= 0 or label == "'})
        assert hostile.status_code == 200 and hostile.json()["results"] == []
        assert client.post("/api/search", data={"path": "005/001.jpg", "folder": "../x"}).status_code == 400
        # Another writer removes images (Milvus Lite: one process at a time, so here in this process).
        remove_from_index(folder, paths=["005/001.jpg"], ids=[0])
        assert client.get("/api/info").json()["count"] == 94
        listed = [item["path"] for item in client.get("/api/gallery", params={"limit": 500}).json()["items"]]
        assert "005/001.jpg" not in listed and "000/000.jpg" not in listed and len(listed) == 94
        assert client.post("/api/search", data={"path": "005/001.jpg"}).status_code == 404
        assert client.get("/gallery/005/001.jpg").status_code == 404


def test_build_search_and_remove_command_lines_on_milvus(tiny, tmp_path, capsys):
    folder = tmp_path / "index"
    args = [f"ckpt={tiny.ckpt}", f"gallery={tiny.gallery}", f"out={folder}", "index.backend=milvus", "num_workers=0"]
    assert main_build_index(args) == 0
    assert "96 images (96 labelled), 16-d, flat index in Milvus" in capsys.readouterr().out
    assert (
        main_search([f"index={folder}", f"query={tiny.gallery / '005/001.jpg'}", "k=3", "folder=007", "json=true"]) == 0
    )
    document = json.loads(capsys.readouterr().out)
    assert [r["path"].split("/")[0] for r in document["results"]] == ["007"] * 3
    assert main_build_index([f"out={folder}", "remove=007/000.jpg,007/001.jpg", "remove_ids=3"]) == 0
    assert "removed 3 images, 93 left (milvus index)" in capsys.readouterr().out
    assert main_build_index([f"out={folder}", "remove=007/000.jpg"]) == 2
    assert capsys.readouterr().err.startswith("error: the index holds no image '007/000.jpg'")
    new = [f"ckpt={tiny.ckpt}", f"out={tmp_path / 'new'}", f"gallery={tiny.gallery}"]
    assert main_build_index([*new, "index.backend=faiss", "index.uri=x.db"]) == 2
    assert capsys.readouterr().err.startswith("error: index.uri= names a Milvus database: it needs index.backend=")


def test_index_backend_is_a_check_and_index_uri_finds_a_moved_milvus_index(
    tiny, embedder, faiss_index, tmp_path, capsys
):
    from fastapi.testclient import TestClient

    from metricsearch.cli.benchmarks import main_load_test
    from metricsearch.cli.search import main_serve
    from metricsearch.search.server import create_app

    folder, built_at, moved = tmp_path / "index", tmp_path / "first" / "gallery.db", tmp_path / "moved" / "gallery.db"
    build_milvus_index(
        faiss_index.embeddings, faiss_index.paths, faiss_index.labels, embedder, faiss_index.gallery_root, folder,
        uri=built_at,
    )  # fmt: skip
    release(str(built_at))
    moved.parent.mkdir()
    shutil.move(built_at, moved)
    query = [f"query={tiny.gallery / '005/001.jpg'}", "k=3", "json=true", "grid=none"]

    def refused(main, args) -> str:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    # Where the metadata says it is, the collection is gone; the message names the option that finds it.
    assert "give index.uri=ITS_PATH" in refused(main_search, [f"index={folder}", *query])
    assert main_search([f"index={folder}", "index.backend=milvus", f"index.uri={moved}", *query]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["path"] == "005/001.jpg"
    # A faiss index refuses a Milvus check and a Milvus uri; an unknown backend is named.
    err = refused(main_search, [f"index={tiny.index_dir}", "index.backend=milvus", *query])
    assert "is a faiss index, not index.backend=milvus" in err
    assert "leave index.uri= out" in refused(main_search, [f"index={tiny.index_dir}", f"index.uri={moved}", *query])
    assert "index.backend='elastic' is not one of faiss, milvus" in refused(
        main_search, [f"index={folder}", "index.backend=elastic", *query]
    )
    assert "is a milvus index, not index.backend=faiss" in refused(
        main_serve, [f"index={folder}", "index.backend=faiss"]
    )
    # The load test checks them before it starts a server; with url= they do not apply.
    assert "is a faiss index" in refused(main_load_test, [f"index={tiny.index_dir}", "index.backend=milvus"])
    assert "go with index=" in refused(main_load_test, ["url=http://127.0.0.1:9", "index.uri=x.db"])

    # The server answers from the moved collection, and keeps it when the index changes and is reopened.
    with TestClient(create_app(folder, backend="milvus", uri=str(moved))) as client:
        assert client.get("/api/info").json()["count"] == 96
        remove_from_index(folder, paths=["000/000.jpg"], backend="milvus", uri=moved)
        assert client.get("/api/info").json()["count"] == 95
        assert client.post("/api/search", data={"path": "005/001.jpg", "k": "1"}).json()["results"][0]["score"] > 0.99
    # The change recorded where the collection is now: no index.uri= needed any more.
    assert json.loads((folder / METADATA_NAME).read_text())["uri"] == str(moved)
    assert len(load_gallery_index(folder)) == 95


@pytest.mark.slow  # two spawned processes that import the package and start Milvus Lite: 25 s to minutes
def test_the_backend_benchmark_measures_milvus_lite_beside_faiss():
    from metricsearch.analysis.docs_tables import format_backend_table
    from metricsearch.benchmarks.search_backends import run_backend_benchmark

    result = run_backend_benchmark(
        n=3000, dim=32, num_queries=50, clusters=50, seconds=0.2, backends=(("faiss", "flat"), ("milvus", "flat"))
    )
    faiss_row, milvus_row = result["rows"]
    assert "error" not in milvus_row, milvus_row
    assert faiss_row["recall@10"] == 1.0 and milvus_row["recall@10"] == 1.0  # both exact: the same top 10
    for row in (faiss_row, milvus_row):
        assert row["qps"][1] > 0 and row["qps"][16] > 0 and row["build_s"] > 0 and row["add_1k_s"] > 0
    assert "| Milvus Lite | flat |" in format_backend_table(result)
