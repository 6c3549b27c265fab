"""The search web server: a page to query by upload or by gallery click, and a JSON API.

Routes:
    ``GET /``                       the page (:mod:`metricsearch.search.page`)
    ``GET /api/info``               index size, embedding size, index kind, model
    ``GET /api/gallery``            a page of gallery items (``offset``, ``limit``)
    ``GET /gallery/{path}``         a gallery image; only files the index holds, inside the gallery root
    ``POST /api/search``            multipart ``file`` (an upload) or ``path`` (a gallery image), and ``k``

Untrusted input is bounded before it costs anything: the request body is cut off at the upload limit while
it streams in (413), an image's pixel count is read from its header and checked before it is decoded (413:
no decompression bombs), and anything PIL cannot identify is refused (415). Searches run in FastAPI's thread
pool; model calls are serialised by a lock (the network already uses every core for one image, so parallel
calls would only contend), while faiss searches of the read-only index run concurrently.
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from metricsearch.data.io import ImageLoadError, load_rgb_image
from metricsearch.search.embedder import Embedder
from metricsearch.search.index import GalleryIndex, Hit
from metricsearch.search.page import render_page
from metricsearch.search.pipeline import open_index

log = logging.getLogger(__name__)

# Room for the multipart envelope (boundaries, part headers, the k and path fields) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Limits and defaults of the server.

    Attributes:
        default_k: results per search when the request does not say.
        max_k: most results a request may ask for.
        max_upload_bytes: largest accepted upload.
        max_pixels: largest accepted image (width x height), checked before decoding.
        gallery_page_size: thumbnails the page loads per click.
    """

    default_k: int = 10
    max_k: int = 100
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    gallery_page_size: int = 48


class UploadRejected(HTTPException):
    """An upload refused with a 4xx status and a message for the user."""


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, whether declared up front or streamed in chunks.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked body is counted
    as it arrives and cut off at the limit, so an upload never fills the disk with a spooled temp file.

    Args:
        app: the ASGI app to protect.
        max_bytes: largest accepted body.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the request is larger than the upload limit of {self.max_bytes / 1024 / 1024:.1f} MiB"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._message()}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while reading the body straight through.
                    raise UploadRejected(413, self._message())
            return message

        await self.app(scope, limited_receive, send)


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded file as an RGB image, refusing non-images, corrupt files and oversized pixel counts.

    Raises:
        UploadRejected: 400 (empty or corrupt), 413 (too many pixels), 415 (not an image).
    """
    if not data:
        raise UploadRejected(400, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Opening reads only the header: the size is known before any pixel is decoded.
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
                image_format = header.format
    except UnidentifiedImageError as err:
        raise UploadRejected(415, "the uploaded file is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UploadRejected(413, f"the uploaded image has too many pixels to decode safely ({err})") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types for malformed headers
        raise UploadRejected(
            400, f"the uploaded image is corrupt or truncated: its header cannot be read ({type(err).__name__}: {err})"
        ) from err
    if width * height > max_pixels:
        raise UploadRejected(
            413,
            f"the uploaded image is {width} x {height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f}; a decompression bomb or simply too large: resize it",
        )
    # The project's one decoding path (full decode, alpha over white, 16-bit handled) reads from a file.
    with tempfile.NamedTemporaryFile(suffix=f".{(image_format or 'img').lower()}") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_rgb_image(tmp.name)
        except ImageLoadError as err:
            cause = err.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause else str(err)
            raise UploadRejected(400, f"the uploaded {image_format} image is corrupt or truncated ({reason})") from err


def gallery_url(path: str) -> str:
    """URL of a gallery image, each path segment percent-encoded."""
    return "/gallery/" + quote(path, safe="/")


def _hit_json(hit: Hit) -> dict[str, Any]:
    return {"rank": hit.rank, "path": hit.path, "label": hit.label, "score": hit.score, "url": gallery_url(hit.path)}


def build_app(index: GalleryIndex, embedder: Embedder, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``index``; ``embedder`` must be the model that built it (checked here)."""
    settings = settings or ServerSettings()
    index.check_embedder(embedder)
    root = Path(index.gallery_root).resolve()
    model_lock = threading.Lock()
    page = render_page(settings.gallery_page_size)

    app = FastAPI(title="MetricSearch", docs_url="/api/docs", redoc_url=None)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.state.index, app.state.embedder, app.state.settings = index, embedder, settings

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "count": len(index),
            "embedding_dim": index.embedding_dim,
            "index_kind": index.index_params["kind"],
            # The file name only: the page may be seen by people who have no business knowing server paths.
            "model": f"{embedder.source['kind']} {Path(embedder.source['path']).name} ({embedder.fingerprint[:12]})",
            "default_k": settings.default_k,
            "max_k": settings.max_k,
            "max_upload_bytes": settings.max_upload_bytes,
        }

    @app.get("/api/gallery")
    def gallery(
        offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 48
    ) -> dict[str, Any]:
        items = [
            {"position": i, "path": index.paths[i], "label": index.labels[i], "url": gallery_url(index.paths[i])}
            for i in range(offset, min(offset + limit, len(index)))
        ]
        return {"total": len(index), "offset": offset, "items": items}

    @app.get("/gallery/{path:path}")
    def gallery_file(path: str) -> FileResponse:
        # Only paths the index holds are served; those never contain "..", but a symlink inside the gallery
        # could still point elsewhere, so the resolved file must lie inside the root as well.
        if path not in index:
            raise HTTPException(404, "no such gallery image")
        file = (root / path).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise HTTPException(404, "no such gallery image")
        return FileResponse(file, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})

    @app.post("/api/search")
    def search(
        file: Annotated[UploadFile | None, File()] = None,
        path: Annotated[str | None, Form()] = None,
        k: Annotated[int | None, Form()] = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        k = settings.default_k if k is None else k
        if not 1 <= k <= settings.max_k:
            raise HTTPException(400, f"k must be between 1 and {settings.max_k}, got {k}")
        if (file is None) == (path is None):
            raise HTTPException(400, "send exactly one of: an image file (field 'file') or a gallery path ('path')")
        if path is not None:
            if path not in index:
                raise HTTPException(404, f"{path!r} is not an image of this gallery")
            # A gallery image's embedding is already stored: no decoding, no model call.
            query = index.embeddings[index.position_of(path)][None]
            described = {"kind": "gallery", "path": path, "label": index.labels[index.position_of(path)]}
        else:
            # Read one byte past the limit to know whether the file exceeds it without reading it all.
            data = file.file.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise UploadRejected(
                    413, f"the upload is larger than the limit of {settings.max_upload_bytes / 1024 / 1024:.1f} MiB"
                )
            image = decode_upload(data, settings.max_pixels)
            with model_lock:
                query = embedder.embed_images([image])
            described = {"kind": "upload", "filename": file.filename, "size": list(image.size)}
        hits = index.search(np.asarray(query, dtype=np.float32), k)[0]
        return {
            "query": described,
            "k": k,
            "took_ms": (time.perf_counter() - started) * 1000,
            "results": [_hit_json(hit) for hit in hits],
        }

    return app


def create_app(
    index_dir: str | Path,
    ckpt: str | Path | None = None,
    model: str | Path | None = None,
    backbone: str | None = None,
    gallery: str | Path | None = None,
    settings: ServerSettings | None = None,
) -> FastAPI:
    """The app for the index in ``index_dir``, with the model it records (or the one given, if it matches)."""
    index, embedder = open_index(index_dir, ckpt=ckpt, model=model, backbone=backbone, gallery=gallery)
    return build_app(index, embedder, settings)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Runs ``app`` with uvicorn until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("Serving on %s: anyone who can reach this machine can use the search and see the gallery", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
