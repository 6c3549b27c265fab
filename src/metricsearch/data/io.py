"""Reading images robustly, and building a dataset's files once.

Every image the project trains or searches on goes through :func:`load_rgb_image`, so a bad file fails
loudly with its path instead of silently becoming a grey square in the middle of a run. A folder of generated
or converted files (a dataset, a cache) is built through :func:`build_once`, which marks a finished build with a
manifest written last (atomically, see :mod:`metricsearch.utils.atomic_io`).
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
# File suffixes read as images (compared in lower case), wherever a folder is scanned for them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageLoadError(DatasetError):
    """An image file is missing, unreadable, truncated or not an image at all."""


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
        ImageLoadError: The file is missing, unreadable, truncated, corrupt, of an unsupported pixel mode, or
            so large that decoding it could exhaust memory (PIL's decompression-bomb limit).
    """
    path = Path(path)
    try:
        # NOTE: PIL only warns between MAX_IMAGE_PIXELS and twice that; treat the warning as the error it is
        # for a training set, where one giant file would stall or kill a data-loader worker.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
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
