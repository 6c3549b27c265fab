"""What "nothing was lost" is checked against: the exact content of a folder before and after a fault."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative POSIX path) mapped to the SHA-256 of its bytes; folders as ``"dir"``."""
    return {
        path.relative_to(folder).as_posix(): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
    }
