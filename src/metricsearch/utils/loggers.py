"""Experiment loggers that need more than a constructor call.

W&B must work with and without an account and never hang without a network: ``mode: auto`` goes online only
when there are credentials *and* the W&B host answers within a few seconds, and offline otherwise (``wandb sync
<run folder>/wandb/offline-run-*`` uploads such a run later).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)

DEFAULT_WANDB_HOST = "https://api.wandb.ai"
# WANDB_DATA_DIR as the user set it before any logger of this process changed it (None: not set).
_USER_WANDB_DATA_DIR = os.environ.get("WANDB_DATA_DIR")


def wandb_has_credentials() -> bool:
    """True when W&B can go online: an API key in the environment or in ~/.netrc from ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)).hostname or "api.wandb.ai"
    try:
        return host in netrc.read_text()
    except OSError:
        return False


def wandb_host_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the W&B host (``WANDB_BASE_URL``) opens within ``timeout`` seconds.

    The connection attempt, DNS lookup included, runs in a daemon thread: a resolver that never answers cannot
    block the caller beyond ``timeout``.
    """
    url = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST))
    host = url.hostname
    if not host:
        return False
    port = url.port or (80 if url.scheme == "http" else 443)
    reachable = threading.Event()

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                reachable.set()
        except OSError:
            pass

    thread = threading.Thread(target=connect, name="wandb-reachability", daemon=True)
    thread.start()
    thread.join(timeout)
    return reachable.is_set()


def resolve_wandb_mode(mode: str = "auto", probe_timeout: float = 3.0) -> str:
    """The W&B mode a run uses; ``WANDB_MODE`` in the environment always wins.

    Args:
        mode: ``auto``, ``online``, ``offline`` or ``disabled``. ``auto`` means online with credentials and a
            reachable host, offline otherwise, so a run never waits for a login or a dead network.
        probe_timeout: Seconds to wait for the W&B host in ``auto`` mode.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if not wandb_has_credentials():
        return "offline"
    if not wandb_host_reachable(probe_timeout):
        log.warning("W&B credentials found but the W&B host does not answer: logging offline (`wandb sync` later)")
        return "offline"
    return "online"


def build_wandb_logger(
    project: str = "metricsearch",
    save_dir: str = ".",
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    log_model: bool | str = False,
    probe_timeout: float = 3.0,
    job_type: str | None = None,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` in the mode :func:`resolve_wandb_mode` picks.

    Args:
        project: W&B project.
        save_dir: The run folder; W&B writes ``<save_dir>/wandb/{offline-,}run-*`` there.
        mode: ``auto`` | ``online`` | ``offline`` | ``disabled``.
        name: Run name (W&B makes one up when None).
        group: Run group, e.g. one per sweep.
        tags: Run tags.
        log_model: Lightning's own upload of every checkpoint at the end of fitting; the default callbacks
            already upload the best checkpoint (``RunTrackingCallback``), so this stays off.
        probe_timeout: Seconds to wait for the W&B host in ``auto`` mode.
        job_type: W&B job type within the group (``make compare``: ``search`` or ``final``).
    """
    import wandb

    mode = resolve_wandb_mode(mode, probe_timeout)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if wandb.run is not None:
        # A run left open by an earlier job of this process (Hydra multirun, Optuna, tests) would otherwise be
        # silently reused by the new logger and receive this job's metrics.
        wandb.finish()
    if mode in ("offline", "dryrun") and _USER_WANDB_DATA_DIR is None:
        # Offline, wandb stages artifact files and media tables in WANDB_DATA_DIR until `wandb sync` uploads
        # them; by default that is a folder in the user's home shared by every run. Keeping them in the run folder
        # makes the run complete and self-contained, and deleting the run deletes them.
        os.environ["WANDB_DATA_DIR"] = str(Path(save_dir).resolve() / "wandb" / "data")
    if mode in ("offline", "dryrun"):
        log.info("W&B runs offline; upload later with `wandb sync %s`", Path(save_dir) / "wandb" / "offline-run-*")
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name,
        group=group,
        job_type=job_type,
        tags=list(tags or []),
        mode=mode,
        log_model=log_model,
        # NOTE: the service process may wait long on an unreachable host; fail fast instead of hanging a run.
        settings={"init_timeout": 60, "silent": True},
    )


def finish_loggers(loggers: Iterable[Logger]) -> None:
    """Closes the W&B runs of ``loggers`` so that the next run of this process starts a fresh one.

    Lightning's ``WandbLogger`` never finishes its run; without this the run stays open until the process exits.
    """
    for logger in loggers:
        experiment: Any = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()
