"""ONNX export: onnxruntime matches PyTorch on real photos and ranks every gallery exactly as the checkpoint does."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from fastapi.testclient import TestClient

from metricsearch.cli.search import main_export
from metricsearch.inference.errors import ModelLoadError
from metricsearch.inference.export import check_parity, export_onnx
from metricsearch.inference.model_loading import ONNX_FINGERPRINT, ONNX_MODEL_CONFIG, OnnxEmbedder, load_embedder
from metricsearch.inference.predict_embeddings import make_predict_trainer
from metricsearch.pipelines.index import build_index, search_files
from metricsearch.search.errors import IndexMismatchError
from metricsearch.search.index import GalleryIndex, open_index
from metricsearch.search.server import create_app
from tests.search_fixtures import PHOTO_NAMES, photo

MAX_ABS_DIFFERENCE = 1e-4


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    embedder = load_embedder(ckpt=tiny.ckpt)
    path = export_onnx(embedder, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return embedder, OnnxEmbedder(path)


def _photo_batch(embedder) -> torch.Tensor:
    return torch.stack([embedder.transform(photo(name)) for name in PHOTO_NAMES])


def test_onnx_matches_pytorch_on_real_photos(exported):
    torch_embedder, onnx_embedder = exported
    batch = _photo_batch(torch_embedder)
    assert check_parity(torch_embedder, onnx_embedder, batch) <= MAX_ABS_DIFFERENCE
    # The batch axis is dynamic: one image and many give the same embeddings.
    single = onnx_embedder.embed_tensor(batch[:1])
    assert torch.allclose(single, onnx_embedder.embed_tensor(batch)[:1], atol=1e-6)


def test_the_export_carries_preprocessing_and_fingerprint(exported):
    torch_embedder, onnx_embedder = exported
    assert onnx_embedder.fingerprint == torch_embedder.fingerprint
    assert onnx_embedder.preprocessing == torch_embedder.preprocessing
    assert onnx_embedder.embedding_dim == torch_embedder.embedding_dim == 16
    proto = onnx.load(str(onnx_embedder.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[ONNX_MODEL_CONFIG]) == torch_embedder.model_config
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnx_ranks_the_gallery_exactly_as_the_checkpoint(tiny, exported):
    torch_embedder, onnx_embedder = exported
    index, embedder = open_index(tiny.index_dir, model=onnx_embedder.path)  # accepted: same fingerprint
    assert isinstance(embedder, OnnxEmbedder)
    queries = [tiny.gallery / f"{c:03d}" / "001.jpg" for c in range(12)]
    for by_onnx, by_torch in zip(
        search_files(index, embedder, queries, k=20), search_files(index, torch_embedder, queries, k=20), strict=True
    ):
        assert [h.path for h in by_onnx] == [h.path for h in by_torch]
        assert [h.score for h in by_onnx] == pytest.approx([h.score for h in by_torch], abs=MAX_ABS_DIFFERENCE)


def test_an_index_built_with_onnx_is_searchable_with_the_checkpoint(tiny, exported, tmp_path):
    torch_embedder, onnx_embedder = exported
    trainer = make_predict_trainer(progress_bar=False)
    built = build_index(onnx_embedder, tiny.gallery, tmp_path / "index", trainer=trainer)
    assert built.model["source"]["kind"] == "onnx"
    reference = GalleryIndex.load(tiny.index_dir)
    assert (abs(built.embeddings - reference.embeddings)).max() <= MAX_ABS_DIFFERENCE
    index, embedder = open_index(tmp_path / "index")  # reopens the ONNX file the index records
    assert isinstance(embedder, OnnxEmbedder)
    open_index(tmp_path / "index", ckpt=tiny.ckpt)
    with pytest.raises(IndexMismatchError):
        open_index(tmp_path / "index", ckpt=tiny.other_ckpt)


def test_the_server_searches_with_the_onnx_model(tiny, exported):
    _, onnx_embedder = exported
    by_onnx = TestClient(create_app(tiny.index_dir, model=onnx_embedder.path))
    by_ckpt = TestClient(create_app(tiny.index_dir))
    assert "onnx tiny.onnx" in by_onnx.get("/api/info").json()["model"]
    upload = {"file": ("q.jpg", (tiny.gallery / "009" / "006.jpg").read_bytes(), "image/jpeg")}
    answers = [c.post("/api/search", files=upload, data={"k": "10"}).json()["results"] for c in (by_onnx, by_ckpt)]
    assert [r["path"] for r in answers[0]] == [r["path"] for r in answers[1]]
    assert answers[0][0]["path"] == "009/006.jpg"


def test_an_onnx_file_without_metadata_is_refused(exported, tmp_path):
    proto = onnx.load(str(exported[1].path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelLoadError, match="has no MetricSearch metadata"):
        OnnxEmbedder(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        OnnxEmbedder(tmp_path / "junk.onnx")


def test_export_command_line(tiny, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main_export([f"ckpt={tiny.ckpt}", "format=onnx", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and "max |difference|" in printed
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta[ONNX_FINGERPRINT] == load_embedder(ckpt=tiny.ckpt).fingerprint
    assert main_export([f"ckpt={tiny.ckpt}", "format=tflite"]) == 2
    assert "only format is onnx" in capsys.readouterr().err


def test_pretrained_backbone_export_matches_on_real_photos(tmp_path):
    """Full-size real photos through the ImageNet EfficientNet-Lite0: the same within 1e-4, the same ranking."""
    torch_embedder = load_embedder(backbone="efficientnet_lite0_imagenet")
    onnx_embedder = OnnxEmbedder(export_onnx(torch_embedder, tmp_path / "lite0.onnx"))
    batch = _photo_batch(torch_embedder)
    assert check_parity(torch_embedder, onnx_embedder, batch) <= MAX_ABS_DIFFERENCE
    by_torch, by_onnx = torch_embedder.embed_tensor(batch), onnx_embedder.embed_tensor(batch)
    # Each photo against all others: the two models order every row identically.
    assert torch.equal((by_torch @ by_torch.T).argsort(dim=1), (by_onnx @ by_onnx.T).argsort(dim=1))
