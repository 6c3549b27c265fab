"""Files written atomically, and the leftovers of writers that were killed mid-write recognised and removed.

Every output the project writes goes through :func:`atomic_path` (or the two helpers built on it), so a crash
or a full disk never leaves a half-written checkpoint, index or manifest where a finished one is expected. A
writer killed before its rename leaves its temporary file behind; the name of that file says which file it
would have replaced and which process wrote it, so the folder's owner can clean up
(:func:`remove_orphaned_temp_files`) without touching a save still in progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# The temporary name atomic_path writes under: ".<stem>.tmp-<pid>-<hex><suffix>" beside the final file.
_TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+(?P<suffix>(\.[^.]+)?)$")


def temp_file_target(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """For a temporary file of :func:`atomic_path`: the name of the file it would replace and the writer's pid.

    None for any other file. Lets a folder's owner recognise (and clean up) what a killed writer left behind.
    """
    match = _TEMP_NAME.match(Path(path).name)
    if match is None:
        return None
    return match["stem"] + match["suffix"], int(match["pid"])


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a file under a temporary name and move it over ``path`` only once writing succeeded.

    The temporary file lives in the same folder, so the final ``os.replace`` is an atomic rename: readers see
    either the old file or the complete new one, never a mix. Its name keeps the suffix of ``path`` because
    writers such as ``PIL.Image.save`` or ``numpy.save`` pick the format from it. The temporary path does not
    exist yet when it is handed out, so the file gets the usual permissions of a newly created file.

    Args:
        path: The file to create or replace; missing parent folders are created.

    Yields:
        The temporary path to write to.

    Raises:
        FileNotFoundError: The body finished without creating the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to the temporary file for {path}")
        # Flush the data before the rename, or a power loss could leave the new name pointing at an empty file.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_is_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (this process, and other users' processes, count)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_orphaned_temp_files(folder: Path, replaces: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Deletes the temporary files of :func:`atomic_path` that writers killed while saving into ``folder`` left.

    A temporary file names the process that writes it; those of live processes (another save in progress) are
    kept.

    Args:
        folder: the folder to clean.
        replaces: which final file names are the caller's to clean up (by default all); temporary files of other
            files are left alone.

    Returns:
        The names removed.
    """
    removed = []
    for path in folder.iterdir():
        target = temp_file_target(path)
        if target is not None and replaces(target[0]) and not process_is_alive(target[1]):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.info("Removed %d temporary files of interrupted saves from %s", len(removed), folder)
    return removed
