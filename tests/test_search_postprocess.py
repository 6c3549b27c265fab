"""Re-ranking and query expansion in a search (``postprocess=``), on a real faiss index and real Milvus Lite.

The reference is the evaluation's implementation (:mod:`metricsearch.metrics.postprocess`) applied to the whole
gallery for one query: when the search's shortlist covers the gallery, the search must rank exactly as it does,
with and without a filter, from the Python API, the command line and the HTTP API.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from metricsearch.cli.search import main_search, main_serve
from metricsearch.data.io import load_rgb_image
from metricsearch.metrics.postprocess import (
    POSTPROCESS_METHODS,
    KReciprocalParams,
    PostprocessSettings,
    augment_database,
    expand_queries,
    k_reciprocal_scores,
)
from metricsearch.search.errors import RequestError
from metricsearch.search.filters import SearchFilter
from metricsearch.search.index import GalleryIndex
from metricsearch.search.milvus_index import build_milvus_index
from metricsearch.search.rerank import SearchPostprocess, search_postprocessed
from metricsearch.utils.config import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("release_milvus")

# Parameters other than the defaults, so that passing them through is tested too (k1 well below the gallery size).
PARAMS = {
    "none": {},
    "aqe": {"k": 3, "alpha": 1.0},
    "dba": {"k": 4, "alpha": 2.0},
    "k_reciprocal": {"k1": 8, "k2": 3, "lambda": 0.2},
}


def open_backend(backend: str, faiss_index: GalleryIndex, embedder, folder: Path):
    if backend == "faiss":
        return faiss_index
    return build_milvus_index(
        faiss_index.embeddings, faiss_index.paths, faiss_index.labels, embedder, faiss_index.gallery_root, folder
    )


def reference_order(method: str, query: np.ndarray, gallery: np.ndarray, params: dict) -> list[int]:
    """Rows of ``gallery`` as the evaluation's functions rank them for ``query`` (equal scores by row)."""
    settings = PostprocessSettings.from_mapping({"method": method, **params})
    if method == "none":
        scores = gallery @ query
    elif method == "aqe":
        scores = gallery @ expand_queries(query[None], gallery, settings.k, settings.alpha)[0]
    elif method == "dba":
        scores = augment_database(gallery, settings.k, settings.alpha) @ query
    else:
        params = KReciprocalParams(settings.k1, settings.k2, settings.lambda_value)
        ((_, block),) = k_reciprocal_scores(query[None], gallery, params)
        scores = block[0]
    return [int(r) for r in np.argsort(-scores, kind="stable")]


def queries_of(faiss_index: GalleryIndex) -> np.ndarray:
    """Two images of the gallery themselves (a gallery-path query) and two new images near gallery ones."""
    rng = np.random.default_rng(0)
    near = faiss_index.embeddings[[7, 60]] + 0.3 * rng.normal(size=(2, faiss_index.embedding_dim)) / 4
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    return np.concatenate([faiss_index.embeddings[[30, 81]], near]).astype(np.float32)


def test_the_defaults_are_the_evaluations_config():
    for method in POSTPROCESS_METHODS:
        config = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "postprocess" / f"{method}.yaml"))
        assert SearchPostprocess.of(method).settings == PostprocessSettings.from_mapping(config), method


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_a_search_ranks_as_the_evaluation_when_the_shortlist_covers_the_gallery(
    backend, embedder, faiss_index, tmp_path
):
    index = open_backend(backend, faiss_index, embedder, tmp_path / "milvus")
    gallery, paths = faiss_index.embeddings, faiss_index.paths
    queries = queries_of(faiss_index)
    everything = len(paths)
    filters = [None, SearchFilter(label="004"), SearchFilter(folder="010")]
    for method, params in PARAMS.items():
        post = SearchPostprocess.of(method, params, shortlist=everything)
        for where in filters:
            allowed = [i for i in range(everything) if where is None or where.matches(paths[i], faiss_index.labels[i])]
            found = search_postprocessed(index, queries, everything, where, post)
            for query, hits in zip(queries, found, strict=True):
                expected = [paths[allowed[r]] for r in reference_order(method, query, gallery[allowed], params)]
                assert [h.path for h in hits] == expected, (backend, method, where)
                assert [h.rank for h in hits] == list(range(1, len(expected) + 1))
                scores = [h.score for h in hits]
                assert scores == sorted(scores, reverse=True)
    # A method changes the ranking of these queries (a test that compared plain searches would pass anyway).
    plain = search_postprocessed(index, queries, everything)
    for method in ("aqe", "dba", "k_reciprocal"):
        reranked = search_postprocessed(index, queries, everything, post=SearchPostprocess.of(method, PARAMS[method]))
        assert any([h.path for h in a] != [h.path for h in b] for a, b in zip(plain, reranked, strict=True)), method


def test_a_shortlist_smaller_than_the_gallery_reranks_only_the_shortlist(faiss_index):
    queries = queries_of(faiss_index)
    for method in ("dba", "k_reciprocal"):
        post = SearchPostprocess.of(method, PARAMS[method], shortlist=20)
        for query, hits, top in zip(
            queries,
            search_postprocessed(faiss_index, queries, 10, post=post),
            faiss_index.search(queries, 20),
            strict=True,
        ):
            rows = [h.position for h in top]
            expected = [
                faiss_index.paths[rows[r]]
                for r in reference_order(method, query, faiss_index.embeddings[rows], PARAMS[method])
            ]
            assert [h.path for h in hits] == expected[:10], method
        # k above the shortlist: k candidates are re-ranked.
        assert len(search_postprocessed(faiss_index, queries[:1], 30, post=post)[0]) == 30


def test_bad_postprocess_values_are_refused():
    for method, params, shortlist, message in [
        ("qe", {}, None, "postprocess='qe' is not one of none, aqe, dba, k_reciprocal"),
        ("aqe", {"k": 0}, None, "postprocess.k must be >= 1"),
        ("aqe", {"beta": 1}, None, "unknown keys"),
        ("k_reciprocal", {"lambda": 1.5}, None, "lambda must lie in [0, 1]"),
        ("dba", {}, 0, "postprocess.shortlist must be between 1 and 2000"),
        ("k_reciprocal", {"k1": 10**6}, None, "postprocess.k1 must be between 1 and 2000"),
    ]:
        with pytest.raises(RequestError, match=re.escape(message)):
            SearchPostprocess.of(method, params, shortlist)
    with pytest.raises(RequestError, match="is not one of"):
        SearchPostprocess.of("aqe").with_method("x" * 10_000)


def test_the_search_command_reranks_and_refuses_bad_values_in_one_line(tiny, embedder, faiss_index, capsys):
    query_file = tiny.gallery / "005" / "001.jpg"
    query = embedder.embed_images([load_rgb_image(query_file)])[0]
    base = [f"index={tiny.index_dir}", f"query={query_file}", "k=10", "json=true", "grid=none"]
    assert main_search([*base, "postprocess=k_reciprocal", "postprocess.k1=8", "postprocess.k2=3"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["postprocess"] == {"method": "k_reciprocal", "k1": 8, "k2": 3, "lambda": 0.3, "shortlist": 100}
    params = {"k1": 8, "k2": 3}
    expected = [faiss_index.paths[r] for r in reference_order("k_reciprocal", query, faiss_index.embeddings, params)]
    assert [r["path"] for r in document["results"]] == expected[:10]
    assert main_search([*base, "postprocess=aqe", "label=003"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["postprocess"] == {"method": "aqe", "k": 2, "alpha": 3.0}
    assert [r["label"] for r in document["results"]] == ["003"] * 8  # the class's 8 images, no others

    for args, message in [
        (["postprocess=qe"], "postprocess='qe' is not one of none, aqe, dba, k_reciprocal"),
        (["postprocess=dba", "postprocess.k=0"], "postprocess.k must be >= 1"),
        (["postprocess=dba", "postprocess.k=two"], "postprocess.k=two is not a valid int"),
        (["postprocess=k_reciprocal", "postprocess.lambda=2"], "lambda must lie in [0, 1]"),
        (["postprocess=dba", "postprocess.shortlist=0"], "postprocess.shortlist must be between 1 and 2000"),
    ]:
        assert main_search([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert main_serve([f"index={tiny.index_dir}", "postprocess=rerank"]) == 2
    assert "postprocess='rerank' is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_the_api_reranks_by_the_servers_setting_or_the_requests(backend, embedder, faiss_index, tmp_path):
    from fastapi.testclient import TestClient

    from metricsearch.search.server import ServerSettings, build_app

    index = open_backend(backend, faiss_index, embedder, tmp_path / "milvus")
    settings = ServerSettings(default_k=96, postprocess=SearchPostprocess.of("dba", PARAMS["dba"]))
    gallery, paths, labels = faiss_index.embeddings, faiss_index.paths, faiss_index.labels
    query = faiss_index.embedding_of("005/001.jpg")
    with TestClient(build_app(index, embedder, settings)) as client:
        info = client.get("/api/info").json()
        assert info["postprocess"] == "dba" and info["postprocess_methods"] == list(POSTPROCESS_METHODS)

        def search(**fields) -> dict:
            answer = client.post("/api/search", data={"path": "005/001.jpg", **fields})
            assert answer.status_code == 200, answer.text
            return answer.json()

        answer = search()  # the server's default, with its parameters
        assert answer["postprocess"] == {"method": "dba", "k": 4, "alpha": 2.0, "shortlist": 100}
        assert [h["path"] for h in answer["results"]] == [
            paths[r] for r in reference_order("dba", query, gallery, PARAMS["dba"])
        ]
        answer = search(postprocess="k_reciprocal")  # the request's method, the server's (default) parameters
        expected = [paths[r] for r in reference_order("k_reciprocal", query, gallery, {})]
        assert [h["path"] for h in answer["results"]] == expected
        answer = search(postprocess="none")
        assert [h["path"] for h in answer["results"]] == [paths[r] for r in reference_order("none", query, gallery, {})]
        # With a filter: the method sees only the images that pass it (aqe takes the server's k and alpha).
        answer = search(postprocess="aqe", label="004", k="5")
        assert answer["postprocess"] == {"method": "aqe", "k": 4, "alpha": 2.0}
        rows = [i for i, lab in enumerate(labels) if lab == "004"]
        expected = [paths[rows[r]] for r in reference_order("aqe", query, gallery[rows], PARAMS["dba"])]
        assert [h["path"] for h in answer["results"]] == expected[:5]

        refused = client.post("/api/search", data={"path": "005/001.jpg", "postprocess": "rerank" + "x" * 5000})
        assert refused.status_code == 400
        assert "is not one of none, aqe, dba, k_reciprocal" in refused.json()["detail"]
        assert len(refused.json()["detail"]) < 200
