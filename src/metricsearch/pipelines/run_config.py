"""A training run's config, checked and resolved once, before torch is imported or anything is built.

``train.py`` composes the config with Hydra; :func:`resolve_run_config` then validates it (one line per mistake,
:func:`metricsearch.utils.config.validate_config`), applies ``selection=`` (:mod:`metricsearch.pipelines.selection`)
and ``resume=`` / ``resume=auto`` (:mod:`metricsearch.pipelines.resume`), each giving a new config instead of changing
the one composed. The result is what the run trains with and what its folder records as ``config.yaml``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from metricsearch.analysis.run_folder import LAST_CHECKPOINT
from metricsearch.pipelines.resume import find_resumable_run
from metricsearch.pipelines.selection import apply_selection
from metricsearch.utils.config import validate_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """A validated, resolved training config and what was decided resolving it.

    Attributes:
        cfg: the config the run trains with (read-only): the selection's settings applied, and with
            ``resume=auto`` the run folder of the run it continues.
        selection: the selection mode (``val``, ``last`` or ``test_best``).
        output_dir: the run folder.
        ckpt_path: the checkpoint training continues from, if any.
        ckpt_setting: what chose ``ckpt_path`` (``ckpt_path``, ``resume`` or ``resume=auto``), for messages.
    """

    cfg: DictConfig
    selection: str
    output_dir: Path
    ckpt_path: str | None = None
    ckpt_setting: str = "ckpt_path"


def resolve_run_config(cfg: DictConfig) -> RunConfig:
    """Validates ``cfg`` and resolves ``selection=`` and ``resume=``; ``cfg`` itself is not changed.

    Raises:
        ConfigError: the first impossible setting, in one line.
    """
    validate_config(cfg)
    resolved, selection = apply_selection(cfg)
    output_dir = Path(resolved.paths.output_dir)
    ckpt_path, ckpt_setting = resolved.get("ckpt_path"), "ckpt_path"
    if resolved.get("resume") == "auto":
        previous = find_resumable_run(resolved, output_dir)
        if previous is None:
            log.info("resume=auto: no unfinished run of this config under %s; starting afresh", output_dir.parent)
        else:
            ckpt_path, ckpt_setting = str(previous / LAST_CHECKPOINT), "resume=auto"
            log.info("resume=auto: continuing %s from %s", previous, ckpt_path)
            resolved = copy.deepcopy(resolved)
            with open_dict(resolved):
                resolved.paths.output_dir = str(previous)
            output_dir = previous
    elif resolved.get("resume"):
        ckpt_path, ckpt_setting = resolved.resume, "resume"
    OmegaConf.set_readonly(resolved, True)
    return RunConfig(resolved, selection, output_dir, ckpt_path, ckpt_setting)
