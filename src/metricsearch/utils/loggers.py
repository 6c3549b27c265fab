"""Experiment loggers that need more than a constructor call."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_has_credentials() -> bool:
    """True when W&B can go online: an API key in the environment or in ~/.netrc from ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto`` means online with credentials and offline without, so a run never hangs waiting for a login."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    return "online" if wandb_has_credentials() else "offline"


def build_wandb_logger(
    project: str = "metricsearch",
    save_dir: str = ".",
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    log_model: bool = False,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` in the mode ``resolve_wandb_mode`` picks; offline runs can be synced later."""
    mode = resolve_wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name,
        group=group,
        tags=list(tags or []),
        mode=mode,
        log_model=log_model,
        # NOTE: the service process may wait long on an unreachable host; fail fast instead of hanging a run.
        settings={"init_timeout": 60, "silent": True},
    )
