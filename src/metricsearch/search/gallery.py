"""Finding the images of a gallery folder and the labels their folders imply."""

from __future__ import annotations

from pathlib import Path

from metricsearch.search.errors import SearchError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def list_gallery_images(root: str | Path) -> tuple[list[str], list[str | None]]:
    """Every image file under ``root``, as sorted POSIX paths relative to it, with a label for each.

    The label of an image is the name of the folder that holds it (the usual ``class_name/image.jpg``
    layout of retrieval datasets); images directly in ``root`` have no label. Hidden files and folders are
    skipped, which also drops the ``._*`` resource forks macOS leaves in archives.

    Args:
        root: the gallery folder.

    Returns:
        Relative paths and labels (None where unknown), in the same order.

    Raises:
        SearchError: ``root`` is not a folder or holds no images.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise SearchError(f"gallery={root} is not a folder")
    paths = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            paths.append(relative.as_posix())
    if not paths:
        raise SearchError(f"gallery={root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    paths.sort()
    labels = [Path(p).parent.name or None for p in paths]
    return paths, labels
