"""Finding the images of a gallery folder and the labels their folders imply."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from metricsearch.data.io import IMAGE_EXTENSIONS
from metricsearch.search.errors import SearchError
from metricsearch.utils.paths import split_inside

log = logging.getLogger(__name__)


def list_gallery_images(root: str | Path) -> tuple[list[str], list[str | None]]:
    """Every image file under ``root``, as sorted POSIX paths relative to it, with a label for each.

    The label of an image is the name of the folder that holds it (the usual ``class_name/image.jpg``
    layout of retrieval datasets); images directly in ``root`` have no label. Hidden files and folders are
    skipped, which also drops the ``._*`` resource forks macOS leaves in archives. So are symbolic links that
    lead out of ``root``: the server only serves files inside it, so an image it would refuse to show is not
    indexed either (see :func:`inside_root`).

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
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            paths.append(relative.as_posix())
    paths = inside_root(root, paths)
    if not paths:
        raise SearchError(f"gallery={root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    paths.sort()
    labels = [Path(p).parent.name or None for p in paths]
    return paths, labels


def inside_root(root: str | Path, paths: Sequence[str]) -> list[str]:
    """The ``paths`` (relative to ``root``) whose files, symbolic links followed, lie inside ``root``.

    The others are left out with a warning that names a few: a link to a file elsewhere would be indexed but
    never served, since the server refuses every file outside the gallery root. The rule is the one every dataset
    reader follows (:mod:`metricsearch.utils.paths`).
    """
    root = Path(root).expanduser().resolve()
    inside, outside_positions = split_inside(root, [root / path for path in paths])
    kept, outside = [paths[i] for i in inside], [paths[i] for i in outside_positions]
    if outside:
        log.warning(
            "Left %d files out of the index that lead outside the gallery %s (symbolic links), e.g. %s",
            len(outside),
            root,
            outside[:3],
        )
    return kept
