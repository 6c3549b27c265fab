"""Reading images robustly, and building a dataset's files once.

Every image the project trains or searches on goes through :func:`load_rgb_image`, so a bad file fails
loudly with its path instead of silently becoming a grey square in the middle of a run, and an image whose header
declares too many pixels or too thin a strip is refused before it is decoded (:func:`check_image_dimensions`).
A folder of generated or converted files (a dataset, a cache) is built through :func:`build_once`, which marks a
finished build with a manifest written last (atomically, see :mod:`metricsearch.utils.atomic_io`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metricsearch.data.records import DatasetError
from metricsearch.utils.atomic_io import atomic_write_text

try:  # POSIX only; elsewhere concurrent builders of one cache are simply not serialized.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# The largest image decoded anywhere (training, evaluation, indexing, search, the server), checked on the header
# before a pixel is decoded: PIL's own decompression-bomb threshold (about 89.5 megapixels, 268 MB as RGB), which
# a 48-megapixel phone photo passes.
MAX_IMAGE_PIXELS = 89_478_485
# The most elongated image decoded (long side over short side). Every model input resizes the short side to a few
# hundred pixels, so the long side grows by the same factor: a 1 x 300,000 strip would become 256 x 76,800,000
# pixels (gigabytes). Photos and product shots, the images of the retrieval benchmarks, are a few to one at most;
# a 20:1 strip resized to a short side of 256 is 256 x 5,120, the cost of an ordinary photo.
MAX_ASPECT_RATIO = 20.0
# File suffixes read as images (compared in lower case), wherever a folder is scanned for them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageLoadError(DatasetError):
    """An image file is missing, unreadable, truncated or not an image at all."""


class ImageTooLargeError(ImageLoadError):
    """An image's header declares more pixels, or a more elongated shape, than the decoder accepts."""


def check_image_dimensions(width: int, height: int, what: str = "the image") -> None:
    """Refuse an image of ``width`` x ``height`` whose decoding or resizing would cost far more than its file size.

    Raises:
        ImageTooLargeError: no pixels, more than :data:`MAX_IMAGE_PIXELS`, or an aspect ratio over
            :data:`MAX_ASPECT_RATIO`.
    """
    if width < 1 or height < 1:
        raise ImageTooLargeError(f"{what} is {width} x {height} pixels: it has no pixels; remove or replace the file")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"{what} is {width:,} x {height:,} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:.1f} (a decompression bomb, or simply too large): resize the file"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageTooLargeError(
            f"{what} is {width:,} x {height:,}, an aspect ratio of {ratio:,.1f}:1, over the limit of "
            f"{MAX_ASPECT_RATIO:g}:1 (resized for a model it would take gigabytes): crop the file"
        )


def load_rgb_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file completely and return it as 8-bit RGB.

    The whole file is decoded here (not lazily on first pixel access), so truncated or corrupt files are
    caught at this call with a message that names them. Transparent images are composited over white, which
    is how they look on the web pages most retrieval datasets were scraped from.

    Args:
        path: The image file.

    Returns:
        An in-memory RGB image, detached from the file.

    Raises:
        ImageLoadError: The file is missing, unreadable, truncated, corrupt, or of an unsupported pixel mode.
        ImageTooLargeError: Its header declares too many pixels or too elongated a shape
            (:func:`check_image_dimensions`), found before any pixel is decoded.
    """
    path = Path(path)
    try:
        # NOTE: PIL only warns between MAX_IMAGE_PIXELS and twice that; treat the warning as the error it is
        # for a training set, where one giant file would stall or kill a data-loader worker.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                # PIL opens lazily: the size comes from the header, before load() decodes a pixel.
                check_image_dimensions(*img.size, what=f"image {path}")
                img.load()
                return _to_rgb(img)
    except ImageTooLargeError:
        raise
    except FileNotFoundError as exc:
        raise ImageLoadError(f"image file {path} does not exist: remove or replace the file") from exc
    except Exception as exc:  # PIL's decoders raise many exception types for bad input
        raise ImageLoadError(
            f"cannot read image {path} ({type(exc).__name__}: {exc}): remove or replace the file"
        ) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a fully loaded image of any mode to RGB."""
    if img.mode == "RGB":
        return img.copy()
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        # PIL's own conversion clips 16-bit values at 255, which turns most 16-bit images white; rescale the
        # full 16-bit range instead ("I" is how older Pillows open 16-bit PNGs).
        pixels = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).convert("RGB")
    # CMYK, YCbCr, 1-bit and palette images; a mode PIL cannot convert raises ValueError, reported by the caller.
    return img.convert("RGB")


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (released by the OS if the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_manifest(folder: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished build of ``folder`` with exactly ``params``, or None if there is none."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("params") != params:
        return None
    return manifest


def build_once(folder: Path, params: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Fill ``folder`` with ``build`` unless a finished build with the same ``params`` is already there.

    The manifest (``params`` plus whatever ``build`` returns) is written last and atomically, so it marks a
    complete build: a folder without one is the remains of an interrupted build and is wiped and rebuilt from
    scratch. Processes that build the same folder at once (data-loader workers, DDP ranks) are serialized by
    a lock file beside it, so one builds and the others reuse its result.

    Args:
        folder: The cache folder that ``build`` fills; it is created empty before ``build`` runs.
        params: Everything the content depends on, compared with the stored manifest (JSON types only).
        build: Writes the content into the folder it is given and returns extra JSON-able manifest entries.

    Returns:
        The manifest of the finished build.
    """
    manifest = read_manifest(folder, params)
    if manifest is not None:
        return manifest
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        manifest = read_manifest(folder, params)  # another process may have finished while we waited
        if manifest is not None:
            return manifest
        if folder.exists():
            log.info("Removing the unfinished or outdated build in %s", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        manifest = {"params": params, **build(folder)}
        atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
        return manifest


def require_built_files(folder: Path, paths: list[Path]) -> None:
    """Fail with the fix if files of a finished build in ``folder`` have gone missing since it was built.

    Raises:
        DatasetError: Some of ``paths`` do not exist.
    """
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(paths)} files built in {folder} are missing (e.g. {missing[0]}): "
            "delete that folder and it will be built again"
        )
