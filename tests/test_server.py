"""The search server's HTTP API: searches by upload and by gallery path, and every way a request can be refused."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import metricsearch.search.server as server_module
from metricsearch.search.errors import IndexMismatchError
from metricsearch.search.index import GalleryIndex, open_index
from metricsearch.search.server import (
    DecodeGate,
    ImageCost,
    ServerSettings,
    UploadRejected,
    build_app,
    check_image_size,
    create_app,
    image_cost,
)
from tests.search_fixtures import (
    UPLOAD_LIMIT,
    BackgroundServer,
    build_limited_app,
    encode,
    png_bomb,
    upload,
)


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
    assert listing["items"][0] == {
        "position": 90,
        "id": 90,
        "path": "011/002.jpg",
        "label": "011",
        "url": "/gallery/011/002.jpg",
    }
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


@pytest.mark.parametrize("k", ["0", "-1", "101"])
def test_k_out_of_bounds_is_refused_with_the_command_lines_rule(client, k):
    response = client.post("/api/search", data={"path": "000/000.jpg", "k": k})
    assert response.status_code == 400 and response.json()["detail"] == f"k must be between 1 and 100, got {k}"


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


# ---------------------------------------------------------------------------------------------------------------
# What an upload may cost: decided from its header, on given numbers


def test_image_cost_is_the_size_before_and_after_resizing_the_short_side():
    assert image_cost(1, 12_000, 256) == ImageCost(1, 12_000, 256, 3_072_000)
    assert image_cost(4000, 3000, 256) == ImageCost(4000, 3000, 341, 256)  # torchvision truncates the long side
    big = image_cost(6000, 6000, 256)
    assert (big.decoded_pixels, big.resized_pixels, big.aspect_ratio, big.pixels) == (36_000_000, 65_536, 1.0, 36e6)
    thin = image_cost(1, 12_000, 256)
    assert thin.aspect_ratio == 12_000 and thin.pixels == 256 * 3_072_000


@pytest.mark.parametrize(
    ("width", "height", "accepted", "message"),
    [
        (
            1,
            12_000,
            False,
            "aspect ratio of 12,000.0:1, over the limit of 20:1 (resizing it for the model would "
            "make it 256 x 3,072,000): crop it",
        ),
        (12_000, 1, False, "aspect ratio of 12,000.0:1"),
        (300, 6000, True, None),  # 20:1 exactly: a long panorama still passes
        (299, 6000, False, "aspect ratio of 20.1:1"),
        (6000, 6000, True, None),  # 36 megapixels: under the 40 megapixel limit
        (7000, 6000, False, "= 42.0 megapixels, over the limit of 40.0"),
        (1, 1, True, None),
        (0, 10, False, "it has no pixels"),
    ],
)
def test_which_image_sizes_the_server_accepts(width, height, accepted, message):
    settings = ServerSettings()
    if accepted:
        cost = check_image_size(width, height, 256, settings)
        assert cost.resized_pixels <= settings.max_resized_pixels
        return
    with pytest.raises(UploadRejected) as refused:
        check_image_size(width, height, 256, settings)
    assert refused.value.status_code in (400, 413) and message in refused.value.detail


def test_the_size_after_resizing_is_bounded_too():
    """A model with a large input: an image within the aspect ratio limit can still grow too much when resized."""
    settings = ServerSettings(max_resized_pixels=1_000_000)
    assert check_image_size(100, 1500, 256, settings).resized_pixels == 256 * 3840
    with pytest.raises(UploadRejected, match=r"256 x 4,864 = 1\.2 megapixels, over the limit of 1\.0"):
        check_image_size(100, 1900, 256, settings)


def test_a_thin_image_is_refused_before_it_is_decoded_or_resized(client, app, monkeypatch):
    """The probe's 126-byte PNG of 1 x 12,000 pixels: resized for a 256-pixel input it would take 2.95 GB."""
    data = encode(Image.new("RGB", (1, 12_000)))
    assert len(data) < 1000

    def must_not_decode(*args, **kwargs):
        raise AssertionError("a refused image was decoded")

    monkeypatch.setattr(server_module, "load_rgb_image", must_not_decode)
    response = upload(client, data, "thin.png", k="3")
    assert response.status_code == 413, response.text
    assert "1 x 12000, an aspect ratio of 12,000.0:1" in response.json()["detail"]


def test_the_decode_gate_admits_at_most_its_limit_of_large_images():
    """Six large images at a gate of two: counted, not timed. Small images pass without waiting."""
    gate = DecodeGate(max_concurrent=2, large_pixels=1000, wait_s=60)
    release = threading.Event()
    inside, done = [], []

    def decode(number: int) -> None:
        with gate.admit(5000):
            inside.append(number)
            assert release.wait(60)
        done.append(number)

    threads = [threading.Thread(target=decode, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    _wait_until(lambda: gate.active == 2 and gate.waiting == 4)
    assert len(inside) == 2
    with gate.admit(999):  # a small image is not held up by the queue of large ones
        pass
    release.set()
    for thread in threads:
        thread.join(60)
    assert sorted(done) == list(range(6)) and gate.peak == 2 and gate.active == gate.waiting == 0


def test_a_large_image_that_gets_no_turn_is_refused_with_503():
    gate = DecodeGate(max_concurrent=1, large_pixels=1000, wait_s=0.01)
    with gate.admit(5000):
        with pytest.raises(UploadRejected) as busy, gate.admit(5000):
            pass
        assert gate.waiting == 0 and gate.active == 1
    assert busy.value.status_code == 503 and "busy decoding other large images" in busy.value.detail
    assert gate.active == 0
    with gate.admit(5000):  # the slot was given back
        assert gate.active == 1


def _wait_until(condition, limit_s: float = 60) -> None:
    """Waits for ``condition()``; the limit only keeps a broken build from hanging the suite."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.005)


def test_concurrent_large_uploads_are_decoded_at_most_two_at_once(tiny, monkeypatch):
    """Six uploads of a 1.2-megapixel PNG (a few KB each) against a server whose large images start at 1 megapixel."""
    index, embedder = open_index(tiny.index_dir)
    settings = ServerSettings(default_k=3, max_pixels=4_000_000, large_image_pixels=1_000_000, max_large_decodes=2)
    app = build_app(index, embedder, settings)
    real_decoder = server_module.load_rgb_image
    release = threading.Event()
    lock = threading.Lock()
    decoding = {"now": 0, "entered": 0, "peak": 0}

    def instrumented(path):
        with lock:
            decoding["now"] += 1
            decoding["entered"] += 1
            decoding["peak"] = max(decoding["peak"], decoding["now"])
        try:
            assert release.wait(60)
            return real_decoder(path)
        finally:
            with lock:
                decoding["now"] -= 1

    monkeypatch.setattr(server_module, "load_rgb_image", instrumented)
    data = encode(Image.new("L", (1200, 1000), 128))
    with TestClient(app) as client, ThreadPoolExecutor(max_workers=6) as pool:
        answers = [pool.submit(upload, client, data, "large.png", k="3") for _ in range(6)]
        gate = getattr(app.state, "decode_gate", None)
        # Either all six got in at once (no bound), or two decode while four wait their turn.
        _wait_until(lambda: decoding["entered"] == 6 or (gate is not None and gate.waiting == 4))
        assert decoding["entered"] == 2 and decoding["now"] == 2
        release.set()
        statuses = [answer.result().status_code for answer in answers]
    assert statuses == [200] * 6
    assert decoding["peak"] == 2 and decoding["entered"] == 6


def test_resizing_an_upload_does_not_hold_the_model_lock(tiny):
    """While one upload is being resized, another upload is decoded, resized, embedded and answered."""
    index, embedder = open_index(tiny.index_dir)
    app = build_app(index, embedder, ServerSettings(default_k=3, max_pixels=4_000_000))
    resizing, release = threading.Event(), threading.Event()
    transform = embedder.transform

    def slow_for_one_size(image):
        if image.size == (40, 90):
            resizing.set()
            assert release.wait(60)
        return transform(image)

    embedder.transform = slow_for_one_size
    data = (tiny.gallery / "004" / "004.jpg").read_bytes()
    with TestClient(app) as client, ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(upload, client, encode(Image.new("RGB", (40, 90), (10, 200, 10))), "slow.png", k="3")
        assert resizing.wait(60)
        try:
            quick = pool.submit(upload, client, data, "q.jpg", k="3")
            # Waits as long as it must; with the resize under the model lock it would wait for `release` forever.
            response = quick.result(timeout=60)
        finally:
            release.set()
        assert response.status_code == 200 and response.json()["results"][0]["path"] == "004/004.jpg"
        assert held.result().status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Malformed requests: a short answer that never echoes what was sent


def test_a_file_sent_without_a_filename_is_refused_without_echoing_it(client):
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (180, 200, 3), dtype=np.uint8)))
    assert 100_000 < len(data) < UPLOAD_LIMIT
    response = client.post("/api/search", files={"file": (None, data)}, data={"k": "3"})
    assert response.status_code == 422
    assert len(response.content) <= 600, f"{len(response.content)} bytes answered for a {len(data)}-byte upload"
    detail = response.json()["detail"]
    assert detail == "invalid request: file: expected an image file (a multipart part with a filename)"


@pytest.mark.parametrize("k", ["abc", "9" * 5000, "1.5"])
def test_a_malformed_k_is_refused_in_one_short_line(client, k):
    response = client.post("/api/search", data={"path": "000/000.jpg", "k": k})
    assert response.status_code == 422 and len(response.content) <= 600
    detail = response.json()["detail"]
    assert detail.startswith("invalid request: k: ") and "\n" not in detail and "99999" not in detail


def test_a_long_unknown_gallery_path_is_not_echoed_whole(client):
    response = client.post("/api/search", data={"path": "x" * 50_000, "k": "3"})
    assert response.status_code == 404 and len(response.content) < 300
