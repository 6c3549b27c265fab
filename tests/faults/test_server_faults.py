"""Server faults: bad uploads over real HTTP are refused with a message and cost nothing, a short load test
(many concurrent clients for a fixed time) gets only correct answers, and a tampered index folder never makes the
server hand out a file that is not one of the gallery's indexed images.

The app, its limits and the upload helper are the HTTP tests' own (``tests/search_fixtures.py``); here they run
behind a real uvicorn server, and each refusal is followed by a search that must get the answer it got before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from metricsearch.benchmarks.load_test import LoadTestError, LoadTestSettings, Sample, SetupError, summarize
from metricsearch.cli.benchmarks import main_load_test
from metricsearch.cli.search import main_serve
from metricsearch.search.errors import SearchError
from metricsearch.search.index import METADATA_NAME, open_index
from metricsearch.search.server import ServerSettings, build_app
from tests.faults.snapshots import snapshot
from tests.search_fixtures import (
    MAX_PIXELS,
    UPLOAD_LIMIT,
    BackgroundServer,
    build_limited_app,
    copy_index,
    encode,
    upload,
)


@pytest.fixture(scope="module")
def server(tiny):
    with BackgroundServer(build_limited_app(tiny)) as server:
        yield server


def _noise_png(side: int) -> bytes:
    """A PNG of random pixels: incompressible, so its size is about 3 * side**2 bytes."""
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)))


@pytest.mark.parametrize(
    ("name", "make", "status", "message"),
    [
        ("report.pdf", lambda _: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n", 415, "is not an image"),
        ("photo.jpg", lambda _: b"plain text saved with a .jpg name\n" * 20, 415, "is not an image"),
        ("garbage.jpg", lambda _: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, 415, "is not an image"),
        ("half.jpg", lambda image: image[: len(image) // 2], 400, "corrupt or truncated"),
        ("huge.png", lambda _: _noise_png(400), 413, "larger than the"),
    ],
    ids=["pdf", "text-named-jpg", "garbage-jpeg", "truncated-jpeg", "oversized"],
)
def test_a_bad_upload_is_refused_and_the_server_answers_as_before(name, make, status, message, tiny, server):
    before = snapshot(tiny.index_dir)
    image = (tiny.gallery / "004" / "004.jpg").read_bytes()
    data = make(image)
    if status == 413:
        assert len(data) > UPLOAD_LIMIT
    with httpx.Client(base_url=server.url, timeout=30) as http:
        expected = upload(http, image, k="5").json()["results"]
        refused = upload(http, data, name, k="5")
        assert refused.status_code == status, refused.text
        assert message in refused.json()["detail"]
        # The same connection, then a new one: the server is unharmed and answers exactly as before.
        assert upload(http, image, k="5").json()["results"] == expected
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert upload(http, image, k="5").json()["results"] == expected
    assert snapshot(tiny.index_dir) == before


def test_a_short_load_test_gets_only_correct_answers(server, tmp_path, capsys):
    out = tmp_path / "load.json"
    assert main_load_test([f"url={server.url}", "clients=3", "duration=2", "queries=8", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"load test: 3 clients x 2 s against {server.url} (96 images, flat faiss index)")
    for field in ("requests", "errors 0", "req/s", "p50", "p99"):
        assert field in printed
    report = json.loads(out.read_text())
    assert report["requests"] > 0 and report["errors"] == 0 and report["error_kinds"] == {}
    assert set(report["by_kind"]) == {"upload", "path"}
    assert sum(part["requests"] for part in report["by_kind"].values()) == report["requests"]
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    # What the numbers came from: the command that gives them again, and the machine.
    command = f"python scripts/load_test.py url={server.url} clients=3 duration=2.0 queries=8 out={out}"
    assert report["command"] == command
    assert report["machine"]["cpu_cores"] == os.cpu_count()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clients": 1000}, "clients=1000 must be between 1 and 256"),
        ({"duration_s": 3600}, "at most 600 s"),
        ({"duration_s": 0}, "must be more than 0"),
        ({"mode": "both"}, "mode='both' is not one of upload, path, mixed"),
        ({"k": 0}, "k must be between 1 and 100, got 0"),
    ],
)
def test_the_load_test_is_bounded(settings, message):
    with pytest.raises(LoadTestError, match=message):
        LoadTestSettings(**settings)


def test_the_load_test_needs_one_target(capsys):
    assert main_load_test(["clients=2"]) == 2
    assert "exactly one of index= (start a server) or url=" in capsys.readouterr().err


def test_a_gallery_image_the_server_will_not_serve_is_counted_not_a_crash(tiny, tmp_path, capsys):
    """The index lists a file that became a link out of the gallery: /gallery/ answers 404, as it should.

    The load test used to die on that 404 with a raw HTTPStatusError; it counts it by its status instead, runs
    the other queries, and exits 1 (the server does not serve its whole gallery).
    """
    gallery, elsewhere = tmp_path / "gallery", tmp_path / "elsewhere"
    shutil.copytree(tiny.gallery, gallery)
    elsewhere.mkdir()
    (elsewhere / "000.jpg").write_bytes((gallery / "000" / "000.jpg").read_bytes())
    (gallery / "000" / "000.jpg").unlink()
    (gallery / "000" / "000.jpg").symlink_to(elsewhere / "000.jpg")
    index, embedder = open_index(tiny.index_dir, gallery=gallery)
    settings = ServerSettings(default_k=5, max_upload_bytes=UPLOAD_LIMIT, max_pixels=MAX_PIXELS)
    out = tmp_path / "load.json"
    with BackgroundServer(build_app(index, embedder, settings)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/gallery/000/000.jpg").status_code == 404
        args = [f"url={server.url}", "mode=upload", "clients=2", "duration=1", "queries=8", f"out={out}"]
        assert main_load_test(args) == 1
    printed = capsys.readouterr().out
    assert "gallery images that could not be queries: 1, e.g. 000/000.jpg (HTTP 404 (fetching the gallery image))" in (
        printed
    )
    report = json.loads(out.read_text())
    assert report["setup_errors"] == [{"path": "000/000.jpg", "error": "HTTP 404 (fetching the gallery image)"}]
    assert report["error_kinds"] == {"HTTP 404 (fetching the gallery image)": 1}
    # Every search that was sent got the right answer: the one error is the image the server would not give.
    assert report["errors"] == 1 and report["by_kind"]["upload"]["errors"] == 0
    assert report["by_kind"]["upload"]["requests"] > 0


def test_search_answers_are_counted_by_status_code():
    samples = [Sample("upload", 0.1, None), Sample("upload", 0.2, "HTTP 503"), Sample("path", 0.1, "HTTP 404")]
    samples += [Sample("path", 0.3, "HTTP 404")]
    report = summarize(samples, 1.0, LoadTestSettings(), "http://x", {}, [SetupError("a.jpg", "HTTP 404 (x)")])
    assert report["errors"] == 4 and report["requests"] == 4
    assert report["error_kinds"] == {"HTTP 503": 1, "HTTP 404": 2, "HTTP 404 (x)": 1}
    assert report["by_kind"]["path"]["errors"] == 2


def test_the_probes_thin_image_is_refused_over_http_and_the_server_answers_as_before(tiny, server):
    """126 bytes of PNG, 1 x 12,000 pixels: resized for the model it would have taken gigabytes under the model lock."""
    thin = encode(Image.new("RGB", (1, 12_000)))
    image = (tiny.gallery / "004" / "004.jpg").read_bytes()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        expected = upload(http, image, k="3").json()["results"]
        refused = upload(http, thin, "thin.png", k="3")
        assert refused.status_code == 413 and "aspect ratio of 12,000.0:1" in refused.json()["detail"]
        assert upload(http, image, k="3").json()["results"] == expected


# ---------------------------------------------------------------------------------------------------------------
# A tampered index folder: the server serves only the gallery's indexed image files, inside an existing gallery root


def _tampered_index(tiny, folder: Path, gallery_root: str, paths: list[str]) -> Path:
    """A copy of the tiny index whose metadata names another gallery root and other first paths (the vectors and
    their checksums untouched, as an attacker who edits only ``metadata.json`` leaves them)."""
    copy_index(tiny, folder)
    meta = json.loads((folder / METADATA_NAME).read_text())
    meta["gallery_root"] = gallery_root
    meta["paths"][: len(paths)] = paths
    (folder / METADATA_NAME).write_text(json.dumps(meta))
    return folder


def _secrets(tmp_path: Path) -> Path:
    """A folder of files no server may hand out: text, and an image in a hidden folder."""
    root = tmp_path / "home"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / ".ssh").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ssh" / "key.png")
    return root


@pytest.mark.parametrize(
    ("gallery_root", "paths", "message"),
    [
        ("/", ["etc/passwd", "proc/self/environ", "root/.bash_history"], "gallery_root should be the absolute path"),
        ("SECRETS", ["etc/passwd"], r"paths\[0\] should name an image file"),
        ("SECRETS", [".ssh/key.png"], r"paths\[0\] should name an image file .* that is not hidden"),
        ("relative/gallery", ["000/000.jpg"], "gallery_root should be the absolute path of the gallery folder"),
    ],
    ids=["file-system-root", "not-an-image", "hidden", "relative-root"],
)
def test_a_tampered_index_is_refused_before_the_server_starts(
    gallery_root, paths, message, tiny, tmp_path, capsys, monkeypatch
):
    secrets = _secrets(tmp_path)
    folder = _tampered_index(tiny, tmp_path / "index", gallery_root.replace("SECRETS", str(secrets)), paths)
    served = []
    monkeypatch.setattr("metricsearch.search.server.serve", lambda app, **where: served.append(app))
    capsys.readouterr()
    assert main_serve([f"index={folder}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: index={folder}: metadata.json is damaged") and "\n" not in err, err
    assert re.search(message, err), err
    assert not served


def test_the_server_serves_only_indexed_image_files_inside_an_existing_gallery(tiny, tmp_path):
    index, embedder = open_index(tiny.index_dir)
    gallery = tmp_path / "gallery"
    shutil.copytree(tiny.gallery, gallery)
    (gallery / "000" / "notes.txt").write_text("not an image")
    (tmp_path / "secret.jpg").write_bytes((gallery / "001" / "000.jpg").read_bytes())
    (gallery / "000" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    # An index in memory holding what the metadata check would refuse on disk: a text file and a link out.
    index.paths[:2] = ["000/notes.txt", "000/link.jpg"]
    index.gallery_root = str(gallery)
    index.__post_init__()
    with TestClient(build_app(index, embedder)) as client:
        assert client.get("/gallery/000/notes.txt").status_code == 404
        assert client.get("/gallery/000/link.jpg").status_code == 404
        assert client.get("/gallery/001/000.jpg").status_code == 200
    index.gallery_root = str(tmp_path / "moved away")
    with pytest.raises(SearchError, match="is not a gallery folder .* pass gallery=PATH"):
        build_app(index, embedder)
