"""Tiny checkpoints, galleries and indexes for the search tests, built once per test session.

A checkpoint here is what training writes, minus the optimizer: the Lightning module built by the real
pipeline from the real (shrunk) config, saved with its ``state_dict`` and ``hyper_parameters``. Building it
directly instead of training saves the seconds a fit costs; one slow test trains for real.

Plain functions (cached per session folder), so every search test module can import them; the server tests
share the app with small limits (:func:`build_limited_app`) and the upload helper (:func:`upload`).
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import lightning as L
import numpy as np
import torch
from PIL import Image

from metricsearch.benchmarks.load_test import free_port
from metricsearch.pipelines.train import build_run
from tests.helpers import compose_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# scikit-image's bundled photos that load without a download (``cat`` is the same photo as ``chelsea``).
PHOTO_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


@dataclass(frozen=True)
class TinySearchSetup:
    """Everything the search tests share.

    Attributes:
        ckpt: a 16-d resnet10t checkpoint of the tiny synthetic config.
        other_ckpt: same architecture and size, other weights (another seed).
        wide_ckpt: same backbone, 8-d embeddings.
        gallery: the tiny synthetic gallery folder (``<class>/<image>.jpg``).
        index_dir: a flat index of ``gallery`` built with ``ckpt``; copy it before changing it.
    """

    ckpt: Path
    other_ckpt: Path
    wide_ckpt: Path
    gallery: Path
    index_dir: Path


def save_tiny_checkpoint(path: Path, data_dir: Path, seed: int = 0, embedding_dim: int = 16) -> Path:
    """A checkpoint of the shrunk default run's module (untrained weights drawn with ``seed``)."""
    cfg = compose_config([f"seed={seed}", f"head.embedding_dim={embedding_dim}"], path.parent, data_dir)
    L.seed_everything(seed, verbose=False)
    module, _ = build_run(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


@functools.cache
def tiny_search_setup(root: Path) -> TinySearchSetup:
    """Builds (once per session folder) the checkpoints, gallery and index of :class:`TinySearchSetup`."""
    from metricsearch.data.synthetic import SyntheticSource
    from metricsearch.inference.model_loading import load_embedder
    from metricsearch.inference.predict_embeddings import make_predict_trainer
    from metricsearch.pipelines.index import build_index

    data_dir = root / "data"
    ckpt = save_tiny_checkpoint(root / "a" / "model.ckpt", data_dir, seed=0)
    other = save_tiny_checkpoint(root / "b" / "model.ckpt", data_dir, seed=1)
    wide = save_tiny_checkpoint(root / "c" / "model.ckpt", data_dir, seed=0, embedding_dim=8)
    source = SyntheticSource(data_dir, num_classes=12, images_per_class=8, image_size=32)
    gallery = source.folder / "images"
    index_dir = root / "index"
    embedder = load_embedder(ckpt=ckpt)
    build_index(embedder, gallery, index_dir, trainer=make_predict_trainer(progress_bar=False))
    return TinySearchSetup(ckpt, other, wide, gallery, index_dir)


def copy_index(setup: TinySearchSetup, dest: Path) -> Path:
    """A private copy of the shared index, for tests that change it."""
    shutil.copytree(setup.index_dir, dest)
    return dest


def photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photos as an RGB image (greyscale ones replicated to 3 channels)."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return Image.fromarray(pixels[..., :3].astype(np.uint8))


def write_photos(folder: Path, names: tuple[str, ...] = PHOTO_NAMES) -> list[str]:
    """Saves photos as ``folder/NAME.png``; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        photo(name).save(folder / f"{name}.png")
    return [f"{name}.png" for name in names]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A few hundred bytes of PNG declaring ``width`` x ``height`` pixels: a decompression bomb's header.

    The image data is a short valid zlib stream of blank rows, so only a decoder that trusts the declared
    size would try to allocate the whole image.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class BackgroundServer:
    """Runs an ASGI app with uvicorn in a daemon thread on 127.0.0.1, for tests that need real HTTP."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        # A generous bound on a loaded machine: the loop ends as soon as the server is up.
        deadline = time.monotonic() + 180
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# The server tests' limits: small enough that an upload over them costs a few hundred kilobytes.
UPLOAD_LIMIT = 200 * 1024
MAX_PIXELS = 4_000_000


def build_limited_app(setup: TinySearchSetup, default_k: int = 5):
    """The search app over the shared tiny index, with the server tests' upload and pixel limits."""
    from metricsearch.search.index import open_index
    from metricsearch.search.server import ServerSettings, build_app

    index, embedder = open_index(setup.index_dir)
    settings = ServerSettings(default_k=default_k, max_upload_bytes=UPLOAD_LIMIT, max_pixels=MAX_PIXELS)
    return build_app(index, embedder, settings)


def upload(client: httpx.Client, data: bytes, name: str = "query.png", **form: str) -> httpx.Response:
    """POSTs ``data`` as the search upload ``name`` (with the form fields ``form``), over a TestClient or real HTTP."""
    return client.post("/api/search", files={"file": (name, data, "application/octet-stream")}, data=form)
