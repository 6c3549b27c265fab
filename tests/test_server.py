"""The search server's HTTP API: searches by upload and by gallery path, and every way a request can be refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from metricsearch.search.errors import IndexMismatchError
from metricsearch.search.index import GalleryIndex
from metricsearch.search.server import create_app
from tests.search_fixtures import (
    UPLOAD_LIMIT,
    BackgroundServer,
    build_limited_app,
    encode,
    png_bomb,
    tiny_search_setup,
    upload,
)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_search_setup(tmp_path_factory.getbasetemp() / "search")


@pytest.fixture(scope="module")
def app(tiny):
    return build_limited_app(tiny)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def test_page_info_and_gallery_listing(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text and 'id="gallery"' in page.text
    info = client.get("/api/info").json()
    assert info["count"] == 96 and info["embedding_dim"] == 16 and info["index_kind"] == "flat"
    assert info["default_k"] == 5
    listing = client.get("/api/gallery", params={"offset": 90, "limit": 10}).json()
    assert listing["total"] == 96 and len(listing["items"]) == 6
    assert listing["items"][0] == {"position": 90, "path": "011/002.jpg", "label": "011", "url": "/gallery/011/002.jpg"}
    image = client.get(listing["items"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


def test_search_by_upload_finds_the_uploaded_gallery_image_first(client, tiny):
    response = upload(client, (tiny.gallery / "007" / "003.jpg").read_bytes(), "007-003.jpg", k="4")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["kind"] == "upload" and body["query"]["filename"] == "007-003.jpg"
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]
    first = body["results"][0]
    assert first["path"] == "007/003.jpg" and first["label"] == "007" and first["score"] == pytest.approx(1, abs=1e-5)
    assert first["url"] == "/gallery/007/003.jpg"


def test_search_by_gallery_path_uses_the_stored_embedding(client, tiny):
    body = client.post("/api/search", data={"path": "002/005.jpg"}).json()
    assert len(body["results"]) == 5  # the server's default k
    assert body["query"] == {"kind": "gallery", "path": "002/005.jpg", "label": "002"}
    index = GalleryIndex.load(tiny.index_dir)
    expected = index.search(index.embeddings[index.position_of("002/005.jpg")][None], 5)[0]
    assert [r["path"] for r in body["results"]] == [h.path for h in expected]


def test_an_upload_over_the_size_limit_is_refused_before_decoding(client):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise))
    assert len(data) > UPLOAD_LIMIT
    response = upload(client, data)
    assert response.status_code == 413 and "larger than the" in response.json()["detail"]


def test_a_file_that_is_not_an_image_is_refused(client):
    response = upload(client, b"%PDF-1.7 not an image", "report.pdf")
    assert response.status_code == 415
    assert response.json()["detail"].startswith("the uploaded file is not an image")
    assert upload(client, b"", "empty.png").status_code == 400


def test_a_truncated_image_is_refused(client, tiny):
    data = (tiny.gallery / "000" / "000.jpg").read_bytes()
    response = upload(client, data[: len(data) // 2])
    assert response.status_code == 400 and "corrupt or truncated" in response.json()["detail"]


def test_a_decompression_bomb_is_refused_from_its_header(client):
    bomb = png_bomb()
    assert len(bomb) < 2000
    response = upload(client, bomb, "bomb.png")
    assert response.status_code == 413
    assert "60000 x 60000" in response.json()["detail"] or "too many pixels" in response.json()["detail"]


def test_an_image_over_the_pixel_limit_is_refused(client):
    response = upload(client, encode(Image.new("L", (2100, 2000))), "big.png")  # 4.2 MP > 4 MP, few bytes
    assert response.status_code == 413 and "over the limit of 4.0" in response.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "/gallery/../../etc/passwd",
        "/gallery/%2e%2e/%2e%2e/etc/passwd",
        "/gallery/..%2f..%2f..%2fetc%2fpasswd",
        "/gallery/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/gallery//etc/passwd",
        "/gallery/000/../../../../etc/passwd",
        "/gallery/000/%2e%2e/001/000.jpg",
        "/gallery/..%5c..%5cetc%5cpasswd",
    ],
)
def test_no_file_outside_the_gallery_is_served(client, url):
    response = client.get(url)
    assert response.status_code in (400, 404)
    assert "root:" not in response.text


def test_only_indexed_files_are_served(client, tiny):
    metadata = tiny.gallery.parent / "manifest.json"  # inside the data folder, next to the images
    assert metadata.is_file()
    assert client.get("/gallery/../manifest.json").status_code == 404
    assert client.get("/gallery/000/999.jpg").status_code == 404


def test_bad_search_requests_say_what_is_wrong(client, tiny):
    assert client.post("/api/search", data={"path": "no/such.jpg"}).status_code == 404
    neither = client.post("/api/search", data={"k": "3"})
    assert neither.status_code == 400 and "exactly one of" in neither.json()["detail"]
    too_many = client.post("/api/search", data={"path": "000/000.jpg", "k": "1000"})
    assert too_many.status_code == 400 and "k must be between 1 and 100" in too_many.json()["detail"]


def test_concurrent_requests_get_their_own_answers(client, tiny):
    """Uploads and gallery clicks from 8 threads at once: every answer equals the one given alone."""
    queries = [("upload", f"{c:03d}/{i:03d}.jpg") for c in range(0, 12, 2) for i in (0, 3)]
    queries += [("path", f"{c:03d}/{i:03d}.jpg") for c in range(1, 12, 2) for i in (1, 6)]

    def ask(query):
        kind, path = query
        if kind == "upload":
            response = upload(client, (tiny.gallery / path).read_bytes(), k="6")
        else:
            response = client.post("/api/search", data={"path": path, "k": "6"})
        assert response.status_code == 200, response.text
        return [(r["path"], round(r["score"], 4)) for r in response.json()["results"]]

    alone = [ask(q) for q in queries]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ask, queries * 2))
    assert together == alone * 2
    assert all(answer[0][0] == path for answer, (_, path) in zip(alone, queries, strict=True))


def test_over_real_http_streamed_uploads_are_cut_off_and_clients_run_in_parallel(app, tiny):
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        # A body with no Content-Length (chunked) is counted as it streams in.
        def chunks():
            yield b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
            for _ in range(64):
                yield b"x" * 8192

        headers = {"content-type": "multipart/form-data; boundary=zzz"}
        response = http.post("/api/search", content=chunks(), headers=headers)
        assert response.status_code == 413 and "upload limit" in response.json()["detail"]
        # And a declared one over the limit is refused before the body is read.
        declared = http.post("/api/search", content=b"x" * (2 * UPLOAD_LIMIT), headers=headers)
        assert declared.status_code == 413

        data = (tiny.gallery / "004" / "004.jpg").read_bytes()

        def ask(_):
            response = http.post("/api/search", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "3"})
            return response.status_code, response.json()["results"][0]["path"]

        with ThreadPoolExecutor(max_workers=6) as pool:
            assert set(pool.map(ask, range(12))) == {(200, "004/004.jpg")}


def test_the_server_refuses_a_model_that_did_not_build_the_index(tiny):
    with pytest.raises(IndexMismatchError):
        create_app(tiny.index_dir, ckpt=tiny.other_ckpt)
    assert isinstance(create_app(tiny.index_dir).state.index, GalleryIndex)


def test_uploads_with_transparency_or_other_modes_are_searchable(client):
    for mode in ("RGBA", "L", "P", "CMYK"):
        image = Image.new("RGB", (40, 30), (200, 30, 30)).convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        response = upload(client, encode(image, fmt), f"q.{fmt.lower()}")
        assert response.status_code == 200, (mode, response.text)
        assert response.json()["query"]["size"] == [40, 30]
