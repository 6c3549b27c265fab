"""Lightning ``Trainer`` settings shared by every run that is not a training run of its own."""

from __future__ import annotations

from typing import Any

from metricsearch.utils.console_logging import quiet_lightning_console


def quiet_trainer_settings() -> dict[str, Any]:
    """``lightning.Trainer`` arguments for a run that leaves nothing behind and prints nothing of its own.

    No logger, no checkpoints, no progress bar, no model summary: what embedding a gallery, a benchmark and a
    test's few steps want. A fresh dict each call; callers add or override what they need. Lightning's INFO lines
    ("GPU available: ...") stay off the console too (see :mod:`metricsearch.utils.console_logging`).
    """
    quiet_lightning_console()
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
