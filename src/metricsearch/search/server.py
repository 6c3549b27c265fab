"""The search web server: a page to query by upload or by gallery click, and a JSON API.

Routes:
    ``GET /``                       the page (:mod:`metricsearch.search.page`)
    ``GET /api/info``               index size, embedding size, index kind, model
    ``GET /api/gallery``            a page of gallery items (``offset``, ``limit``)
    ``GET /gallery/{path}``         a gallery image; only files the index holds, inside the gallery root
    ``POST /api/search``            multipart ``file`` (an upload) or ``path`` (a gallery image), ``k``, and
                                    optionally ``label`` / ``folder`` (only results of that class / under it)
                                    and ``postprocess`` (re-ranking: none, aqe, dba, k_reciprocal)

Untrusted input is bounded before it costs anything: the request body is cut off at the upload limit while
it streams in (413); an image's size is read from its header and checked before it is decoded (413), on
what decoding it costs (pixels: no decompression bombs) and on what resizing it to the model's input costs
(aspect ratio, pixels after the resize: no 1 x 12,000 strip blown up to 256 x 3,072,000); anything PIL
cannot identify is refused (415). Large images are decoded and resized a few at a time
(:class:`DecodeGate`), so concurrent uploads cannot add up their memory. A malformed request is refused
with a short message that never echoes what was sent (422). Searches run in FastAPI's thread pool; only the
network call is serialised by a lock (the network already uses every core for one image, so parallel calls
would only contend), while decoding, resizing and faiss searches of the read-only index run concurrently.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import logging
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Unpack
from urllib.parse import quote

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from metricsearch.data.io import MAX_ASPECT_RATIO, ImageLoadError, ImageTooLargeError, load_rgb_image
from metricsearch.inference.model_choice import ModelChoice
from metricsearch.inference.model_loading import Embedder
from metricsearch.metrics.postprocess import POSTPROCESS_METHODS
from metricsearch.search.backends import AnyIndex
from metricsearch.search.errors import MAX_K, RequestError, SearchError, check_k
from metricsearch.search.filters import SearchFilter
from metricsearch.search.index import Hit, open_index
from metricsearch.search.index_metadata import is_gallery_image_name
from metricsearch.search.live_index import LiveIndex
from metricsearch.search.page import render_page
from metricsearch.search.rerank import SearchPostprocess, search_postprocessed
from metricsearch.utils.messages import shorten
from metricsearch.utils.paths import resolves_inside

log = logging.getLogger(__name__)

# Room for the multipart envelope (boundaries, part headers, the k and path fields) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
# Longest answer to a malformed request: what was wrong, never what was sent.
MAX_VALIDATION_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class ServerSettings:
    """Limits and defaults of the server.

    Attributes:
        default_k: results per search when the request does not say.
        max_k: most results a request may ask for.
        max_upload_bytes: largest accepted upload.
        max_pixels: largest accepted image (width x height), checked before decoding.
        max_aspect_ratio: longest side over shortest side of an accepted image: resizing the short side to the
            model's input makes the long side this many times that (a 1 x 12,000 strip would become
            256 x 3,072,000 pixels). The shared decoder refuses more than
            :data:`~metricsearch.data.io.MAX_ASPECT_RATIO` and :data:`~metricsearch.data.io.MAX_IMAGE_PIXELS` whatever
            the settings say.
        max_resized_pixels: largest image after resizing its short side to the model's input, before the crop.
        large_image_pixels: images of at least this many pixels (decoded or resized) count as large.
        max_large_decodes: large images decoded and resized at once; more wait their turn.
        decode_wait_s: how long a large image waits for its turn before the request is refused (503).
        gallery_page_size: thumbnails the page loads per click.
        postprocess: the re-ranking of a search whose request names none, with the parameters of every method a
            request may name.
    """

    default_k: int = 10
    max_k: int = MAX_K
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    max_resized_pixels: int = 8_000_000
    large_image_pixels: int = 4_000_000
    max_large_decodes: int = 2
    decode_wait_s: float = 30.0
    gallery_page_size: int = 48
    postprocess: SearchPostprocess = field(default_factory=SearchPostprocess)

    def __post_init__(self) -> None:
        check_k(self.default_k, self.max_k)
        for name in ("max_upload_bytes", "max_pixels", "max_resized_pixels", "large_image_pixels", "max_large_decodes"):
            if getattr(self, name) < 1:
                raise SearchError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_aspect_ratio <= MAX_ASPECT_RATIO or self.decode_wait_s <= 0:
            raise SearchError(
                f"max_aspect_ratio ({self.max_aspect_ratio}) must be between 1 and {MAX_ASPECT_RATIO:g} (the decoder's "
                f"bound) and decode_wait_s ({self.decode_wait_s}) positive"
            )


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


@dataclass(frozen=True)
class ImageCost:
    """What decoding an image and resizing its short side to the model's input make of it.

    Attributes:
        width, height: the image as its header declares it.
        resized_width, resized_height: after the resize (the centre crop comes next and is cheap).
    """

    width: int
    height: int
    resized_width: int
    resized_height: int

    @property
    def decoded_pixels(self) -> int:
        return self.width * self.height

    @property
    def resized_pixels(self) -> int:
        return self.resized_width * self.resized_height

    @property
    def aspect_ratio(self) -> float:
        return max(self.width, self.height) / min(self.width, self.height)

    @property
    def pixels(self) -> int:
        """The larger of the decoded and the resized image: what sizes the memory of preparing the query."""
        return max(self.decoded_pixels, self.resized_pixels)


def image_cost(width: int, height: int, short_side: int) -> ImageCost:
    """The cost of an image of ``width`` x ``height`` whose short side is resized to ``short_side``.

    The long side is scaled as torchvision's ``Resize(short_side)`` scales it (truncated to an integer).
    """
    if width < 1 or height < 1:
        raise UploadRejected(400, f"the uploaded image is {width} x {height} pixels: it has no pixels")
    if width <= height:
        return ImageCost(width, height, short_side, int(short_side * height / width))
    return ImageCost(width, height, int(short_side * width / height), short_side)


def check_image_size(width: int, height: int, short_side: int, settings: ServerSettings) -> ImageCost:
    """The cost of an uploaded image of ``width`` x ``height``, if the server accepts it (decided on the header).

    Raises:
        UploadRejected: 413 with what is over which limit: too many pixels to decode, too elongated (aspect
            ratio), or too many pixels once resized.
    """
    cost = image_cost(width, height, short_side)
    size = f"the uploaded image is {width} x {height}"
    if cost.decoded_pixels > settings.max_pixels:
        raise UploadRejected(
            413,
            f"{size} = {cost.decoded_pixels / 1e6:.1f} megapixels, over the limit of {settings.max_pixels / 1e6:.1f}; "
            "a decompression bomb or simply too large: resize it",
        )
    if cost.aspect_ratio > settings.max_aspect_ratio:
        raise UploadRejected(
            413,
            f"{size}, an aspect ratio of {cost.aspect_ratio:,.1f}:1, over the limit of {settings.max_aspect_ratio:g}:1 "
            f"(resizing it for the model would make it {cost.resized_width:,} x {cost.resized_height:,}): crop it",
        )
    if cost.resized_pixels > settings.max_resized_pixels:
        raise UploadRejected(
            413,
            f"{size}; resized for the model it would be {cost.resized_width:,} x {cost.resized_height:,} = "
            f"{cost.resized_pixels / 1e6:.1f} megapixels, over the limit of {settings.max_resized_pixels / 1e6:.1f}: "
            "crop it",
        )
    return cost


def _find_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> None:
    """Hands memory that has been freed back to the operating system (glibc's ``malloc_trim``; elsewhere a no-op).

    PIL allocates an image in 16 MB blocks from the malloc arena of the thread that decodes it, and glibc keeps
    freed blocks in that arena: after large decodes in a dozen server threads, each thread's arena would still
    hold one decoded image (measured: 2.9 GB resident for 12 sequential 36-megapixel decodes, 0.5 GB with this).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class DecodeGate:
    """Lets at most ``max_concurrent`` large images be decoded and resized at once; small ones pass freely.

    One large image costs hundreds of megabytes while it is decoded (a 36-megapixel PNG: 144 MB as PIL holds
    it, and a copy): without a bound, a dozen concurrent uploads of 100 KB files would take gigabytes. A large
    image that cannot get its turn within ``wait_s`` is refused with 503 instead of queueing without end, and
    the memory of each large decode is handed back to the system when its turn ends
    (:func:`release_free_memory`), so the bound holds for what the process keeps resident too.

    Attributes:
        active: large images being decoded now.
        waiting: large images waiting for their turn now.
        peak: the most large images ever decoded at once.
    """

    def __init__(self, max_concurrent: int, large_pixels: int, wait_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.large_pixels = large_pixels
        self.wait_s = wait_s
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self.active = self.waiting = self.peak = 0

    @contextlib.contextmanager
    def admit(self, pixels: int) -> Any:
        """A turn to decode an image of ``pixels`` (waits for one when the image is large).

        Raises:
            UploadRejected: 503 when a large image got no turn within ``wait_s``.
        """
        if pixels < self.large_pixels:
            yield
            return
        with self._lock:
            self.waiting += 1
        try:
            admitted = self._slots.acquire(timeout=self.wait_s)
        finally:
            with self._lock:
                self.waiting -= 1
        if not admitted:
            raise UploadRejected(
                503,
                f"the server is busy decoding other large images (at most {self.max_concurrent} at once); retry in "
                "a moment, or send a smaller image",
                headers={"Retry-After": "5"},
            )
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            release_free_memory()
            with self._lock:
                self.active -= 1
            self._slots.release()


def read_image_header(data: bytes) -> tuple[int, int, str | None]:
    """Width, height and format of an uploaded image, read from its header alone (no pixel is decoded).

    Raises:
        UploadRejected: 400 (empty or corrupt header), 413 (PIL's own decompression-bomb limit), 415 (not an image).
    """
    if not data:
        raise UploadRejected(400, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
                return width, height, header.format
    except UnidentifiedImageError as err:
        raise UploadRejected(415, "the uploaded file is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UploadRejected(413, f"the uploaded image has too many pixels to decode safely ({err})") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types for malformed headers
        raise UploadRejected(
            400, f"the uploaded image is corrupt or truncated: its header cannot be read ({type(err).__name__}: {err})"
        ) from err


def decode_image(data: bytes, image_format: str | None) -> Image.Image:
    """An uploaded file decoded in full as RGB, by the project's one decoding path (which reads from a file).

    Raises:
        UploadRejected: 400 when the pixel data is corrupt or truncated.
    """
    # load_rgb_image: full decode, alpha over white, 16-bit handled.
    with tempfile.NamedTemporaryFile(suffix=f".{(image_format or 'img').lower()}") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_rgb_image(tmp.name)
        except ImageTooLargeError as err:  # the decoder's own bounds, where the settings allow more
            raise UploadRejected(413, f"the uploaded image is {str(err).partition(' is ')[2]}") from err
        except ImageLoadError as err:
            cause = err.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause else str(err)
            raise UploadRejected(400, f"the uploaded {image_format} image is corrupt or truncated ({reason})") from err


def prepare_upload(
    data: bytes, embedder: Embedder, settings: ServerSettings, gate: DecodeGate
) -> tuple[torch.Tensor, tuple[int, int]]:
    """An uploaded file as the network's input ``[1, 3, H, W]``, and the image's size.

    Its size is checked from the header first (:func:`check_image_size`); decoding and resizing then take a
    turn at ``gate`` when the image is large.

    Raises:
        UploadRejected: 400 (empty or corrupt), 413 (over a size limit), 415 (not an image), 503 (busy).
    """
    width, height, image_format = read_image_header(data)
    cost = check_image_size(width, height, embedder.resize_short_side, settings)
    with gate.admit(cost.pixels):
        image = decode_image(data, image_format)
        size, batch = image.size, embedder.preprocess([image])
        del image  # freed before the gate hands the memory back
    return batch, size


def describe_validation_errors(errors: Any) -> str:
    """A malformed request's problems as one short line: where and what, never the values that were sent.

    FastAPI's default answer echoes every invalid input, so a file sent as a plain form field (no filename)
    came back whole, and twice as large once JSON-escaped.
    """
    problems = []
    for error in list(errors)[:5]:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(location) or "request"
        message = str(error.get("msg", "invalid value"))
        if field == "file":
            message = "expected an image file (a multipart part with a filename)"
        problems.append(f"{field[:40]}: {message[:120]}")
    text = "invalid request: " + ("; ".join(problems) or "malformed")
    return text if len(text) <= MAX_VALIDATION_MESSAGE_CHARS else text[: MAX_VALIDATION_MESSAGE_CHARS - 3] + "..."


def gallery_url(path: str) -> str:
    """URL of a gallery image, each path segment percent-encoded."""
    return "/gallery/" + quote(path, safe="/")


def _hit_json(hit: Hit) -> dict[str, Any]:
    return {
        "rank": hit.rank,
        "id": hit.id,
        "path": hit.path,
        "label": hit.label,
        "score": hit.score,
        "url": gallery_url(hit.path),
    }


def build_app(
    index: AnyIndex,
    embedder: Embedder,
    settings: ServerSettings | None = None,
    gallery: str | Path | None = None,
    uri: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``index``; ``embedder`` must be the model that built it (checked here).

    Each request answers from the index as its folder holds it then (:class:`LiveIndex`): images added or removed
    by another process show at once. ``gallery`` and ``uri`` (a Milvus collection's place, ``index.uri=``) are
    applied whenever the index is reopened.
    """
    settings = settings or ServerSettings()
    index.check_embedder(embedder)
    live = LiveIndex(index, embedder, gallery, uri)
    root = Path(index.gallery_root).resolve()
    if not root.is_dir() or root == root.parent:
        raise SearchError(
            f"the gallery root {index.gallery_root} of the index is not a gallery folder (it does not exist, is not a "
            "folder, or is the file system's root); pass gallery=PATH, the folder that holds the indexed images"
        )
    model_lock = threading.Lock()
    gate = DecodeGate(settings.max_large_decodes, settings.large_image_pixels, settings.decode_wait_s)
    page = render_page(settings.gallery_page_size)

    app = FastAPI(title="MetricSearch", docs_url="/api/docs", redoc_url=None)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.state.index, app.state.embedder, app.state.settings = index, embedder, settings
    app.state.decode_gate = gate
    app.state.live_index = live

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation_errors(err.errors())}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        index = live.current()
        return {
            "count": len(index),
            "embedding_dim": index.embedding_dim,
            "index_kind": index.index_params["kind"],
            "backend": index.backend,
            # The file name only: the page may be seen by people who have no business knowing server paths.
            "model": f"{embedder.source['kind']} {Path(embedder.source['path']).name} ({embedder.fingerprint[:12]})",
            "default_k": settings.default_k,
            "max_k": settings.max_k,
            "max_upload_bytes": settings.max_upload_bytes,
            "postprocess": settings.postprocess.method,
            "postprocess_methods": list(POSTPROCESS_METHODS),
        }

    @app.get("/api/gallery")
    def gallery(
        offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 48
    ) -> dict[str, Any]:
        index = live.current()
        items = [
            {
                "position": i,
                "id": index.ids[i],
                "path": index.paths[i],
                "label": index.labels[i],
                "url": gallery_url(index.paths[i]),
            }
            for i in range(offset, min(offset + limit, len(index)))
        ]
        return {"total": len(index), "offset": offset, "items": items}

    @app.get("/gallery/{path:path}")
    def gallery_file(path: str) -> FileResponse:
        # Only the image files the index holds are served; their names never contain "..", but a symlink inside the
        # gallery could still point elsewhere, so the resolved file must lie inside the root as well.
        if path not in live.current() or not is_gallery_image_name(path) or not resolves_inside(root, root / path):
            raise HTTPException(404, "no such gallery image")
        file = (root / path).resolve()
        if not file.is_file():
            raise HTTPException(404, "no such gallery image")
        return FileResponse(file, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})

    @app.post("/api/search")
    def search(
        file: Annotated[UploadFile | None, File()] = None,
        path: Annotated[str | None, Form()] = None,
        k: Annotated[int | None, Form()] = None,
        label: Annotated[str | None, Form()] = None,
        folder: Annotated[str | None, Form()] = None,
        postprocess: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        index = live.current()
        try:
            k = check_k(settings.default_k if k is None else k, settings.max_k)
            where = SearchFilter.of(label, folder)
            post = settings.postprocess.with_method(postprocess or None)
        except RequestError as err:
            raise HTTPException(400, str(err)) from err
        if (file is None) == (path is None):
            raise HTTPException(400, "send exactly one of: an image file (field 'file') or a gallery path ('path')")
        if path is not None:
            if path not in index:
                raise HTTPException(404, f"{shorten(path)} is not an image of this gallery")
            # A gallery image's embedding is already stored: no decoding, no model call.
            query = index.embedding_of(path)[None]
            described = {"kind": "gallery", "path": path, "label": index.labels[index.position_of(path)]}
        else:
            # Read one byte past the limit to know whether the file exceeds it without reading it all.
            data = file.file.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise UploadRejected(
                    413, f"the upload is larger than the limit of {settings.max_upload_bytes / 1024 / 1024:.1f} MiB"
                )
            batch, size = prepare_upload(data, embedder, settings, gate)
            # Only the network call is serialised; decoding and resizing stay outside the lock.
            with model_lock:
                query = embedder.embed_tensor(batch).numpy()
            filename = file.filename[:255] if file.filename else file.filename
            described = {"kind": "upload", "filename": filename, "size": list(size)}
        hits = search_postprocessed(index, np.asarray(query, dtype=np.float32), k, where, post)[0]
        return {
            "query": described,
            "k": k,
            "postprocess": post.describe(),
            "took_ms": (time.perf_counter() - started) * 1000,
            "results": [_hit_json(hit) for hit in hits],
        }

    return app


def create_app(
    index_dir: str | Path,
    gallery: str | Path | None = None,
    settings: ServerSettings | None = None,
    backend: str | None = None,
    uri: str | None = None,
    **choice: Unpack[ModelChoice],
) -> FastAPI:
    """The app for the index in ``index_dir``, with the model it records (or the one ``choice`` names, if it matches;
    see :func:`~metricsearch.search.index.open_index`, which checks ``backend`` and applies ``uri``)."""
    index, embedder = open_index(index_dir, gallery=gallery, backend=backend, uri=uri, **choice)
    return build_app(index, embedder, settings, gallery=gallery, uri=uri)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Runs ``app`` with uvicorn until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("Serving on %s: anyone who can reach this machine can use the search and see the gallery", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
