"""One rule for a path that an input file or a link names: it stays inside its root.

Dataset lists (CUB's ``images.txt``, SOP's ``Ebay_*.txt``, In-Shop's partition, Cars' annotations), a folder
dataset's class folders and files, an index's gallery paths: each names files relative to a root folder, and each
comes from someone else. A name may not be absolute or climb with ``..`` (:func:`join_inside`), and a name that
passes may still lead elsewhere through a symbolic link, so where it *resolves* must lie inside the root as well
(:func:`split_inside`). The dataset readers refuse a list that breaks the rule; the folder dataset, the index
builder and the server leave such files out with a warning (or a 404), so that nothing outside a root is ever
read, drawn or served.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

# ``C:\data`` or ``C:/data``: absolute on Windows, where a list may have been written.
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:([/\\]|$)")


class PathOutsideRootError(ValueError):
    """A name read from a file is absolute or climbs out of its root with ``..``."""


def relative_name_problem(name: str) -> str | None:
    """What makes ``name`` unfit as a path relative to a root: empty, absolute or climbing with ``..``; else None.

    Both separators count, so that ``..\\x`` is refused as well as ``../x``.
    """
    if not name or not name.strip():
        return "it is empty"
    if any(ord(c) < 32 for c in name):
        return "it holds control characters"
    if name.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(name):
        return "it is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "it climbs out of its folder with '..'"
    return None


def join_inside(root: Path, name: str) -> Path:
    """``root / name`` for a relative ``name`` read from an untrusted file, with ``.`` and doubled slashes removed.

    Raises:
        PathOutsideRootError: ``name`` is empty, absolute or climbs with ``..`` (the message says which).
    """
    problem = relative_name_problem(name)
    if problem:
        raise PathOutsideRootError(f"the path {name!r} cannot be used: {problem}; paths must stay inside {root}")
    return root / PurePosixPath(name)


def split_inside(root: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]]) -> tuple[list[int], list[int]]:
    """Positions of the ``paths`` that resolve inside ``root`` (links followed) and of those that do not.

    ``root`` is resolved too, so a root that is itself a link is fine. Each folder is resolved once (120k images
    in a few hundred folders cost a few hundred ``realpath`` calls plus one ``lstat`` per file); a file that is
    itself a link is resolved on its own. A path that does not exist resolves to itself and is judged by its name.
    """
    real_root = os.path.realpath(root)
    folders: dict[str, str] = {}
    inside, outside = [], []
    for position, path in enumerate(paths):
        text = os.path.abspath(os.fspath(path))
        if os.path.islink(text):
            real = os.path.realpath(text)
        else:
            parent, name = os.path.split(text)
            if parent not in folders:
                folders[parent] = os.path.realpath(parent)
            real = os.path.join(folders[parent], name)
        (inside if _is_within(real, real_root) else outside).append(position)
    return inside, outside


def resolves_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether ``path``, links followed, lies inside ``root`` (see :func:`split_inside`)."""
    return not split_inside(root, [path])[1]


def _is_within(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)
