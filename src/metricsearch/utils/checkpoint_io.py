"""Checkpoints written atomically: a kill or a full disk never leaves a truncated ``.ckpt`` that is later loaded."""

from __future__ import annotations

import errno
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from metricsearch.utils.atomic_io import atomic_path

# torch.save's C++ zip writer reports a failed write (a full disk among others) as a RuntimeError naming itself.
_WRITER_FAILURES = ("PytorchStreamWriter", "inline_container", "file write failed")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The first bytes of a zip archive, which torch.save writes.
ZIP_MAGIC = b"PK\x03\x04"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (most often: the disk is full); the message is one line with the room left."""


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write in ``folder``'s file system."""
    return shutil.disk_usage(folder).free


def _write_error(err: BaseException, path: Path, written: int) -> CheckpointWriteError | None:
    """The one-line error for a failed write of ``path``, or None when ``err`` is no write failure."""
    is_oserror = isinstance(err, OSError)
    if is_oserror and err.errno not in _DISK_FULL_ERRNOS:
        return None
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not is_oserror and not any(marker in reason for marker in _WRITER_FAILURES):
        return None
    try:
        free = free_bytes(path.parent)
    except OSError:
        free = None
    room = "unknown space" if free is None else f"{free / 2**20:.1f} MB"
    # NOTE: torch's writer does not say why it failed; a disk with less room than what was already written (or
    # under a megabyte) at that moment is full. The partial file is still there when this is measured.
    if is_oserror or (free is not None and free < max(written, 2**20)):
        what = err.strerror if is_oserror and err.strerror else "the checkpoint writer stopped part way"
        return CheckpointWriteError(
            f"disk full while writing {path} ({what}): {room} free in {path.parent}; free space there, or point "
            "hydra.run.dir (or paths.output_dir) at a disk with room"
        )
    return CheckpointWriteError(f"could not write checkpoint {path} ({reason}); {room} free in {path.parent}")


def unreadable_checkpoint_reason(path: Path, err: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, in plain words (torch's own are about zip readers and pickle memos).

    Args:
        path: the file.
        err: what ``torch.load`` raised (any type: a text file named ``.ckpt`` gives a ``KeyError``).
    """
    try:
        with open(path, "rb") as f:
            starts_as_zip = f.read(4) == ZIP_MAGIC
    except OSError:
        starts_as_zip = False
    if not starts_as_zip:
        return "it is not a PyTorch checkpoint: torch.save writes a zip archive, and this file is not one"
    kind = type(err).__name__
    if kind == "UnpicklingError" and "weights_only" in str(err):
        return "it holds objects other than tensors and plain data, which are not loaded from a file handed over"
    if not zipfile.is_zipfile(path):
        return "it is truncated or corrupt: its zip archive has no end"
    return f"it is truncated or corrupt ({kind} while reading it)"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the target folder, fsyncs it, then renames it over the target.

    Lightning's own writer serialises into memory first but then writes the target file in place, so a
    SIGKILL during that write leaves a truncated checkpoint under the final name. A write that fails (a full
    disk) leaves the previous checkpoint as it was and raises a :class:`CheckpointWriteError` that says how much
    room is left, instead of torch's ``enforce fail at inline_container.cc``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp:
                try:
                    torch.save(checkpoint, tmp)
                except (OSError, RuntimeError) as err:
                    # Measured before atomic_path removes the partial file and gives its space back.
                    written = tmp.stat().st_size if tmp.is_file() else 0
                    error = _write_error(err, path, written)
                    if error is None:
                        raise
                    raise error from err
        except OSError as err:
            # The flush and rename after the write can fail on a full disk too.
            if isinstance(err, CheckpointWriteError) or err.errno not in _DISK_FULL_ERRNOS:
                raise
            raise _write_error(err, path, 0) from err
