"""Checkpoints written atomically: a kill or a full disk never leaves a truncated ``.ckpt`` that is later loaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from metricsearch.data.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the target folder, fsyncs it, then renames it over the target.

    Lightning's own writer serialises into memory first but then writes the target file in place, so a
    SIGKILL during that write leaves a truncated checkpoint under the final name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
