"""Which model a run reports: ``selection=val | last | test_best``.

- ``val`` (default, honest): part of the training classes (``data.val_fraction``) is held out, evaluated after
  every epoch, and the checkpoint with the best ``monitor`` value there is tested once on the test classes.
- ``last`` (honest): every training class is trained on and the last epoch's model is tested; nothing is selected.
- ``test_best`` (optimistic): every training class is trained on, the TEST classes are evaluated after every epoch
  (logged under ``test_epoch/``) and the best of those evaluations is reported. This is how most papers report
  (Proxy-Anchor, Multi-Similarity, XBM): the test set picks the model, so the number is an upper bound of what
  an honest protocol gives. It exists to compare with published numbers, and every output says so.

:func:`apply_selection` turns the choice into a new config holding the settings that implement it, before anything is
built, so the run's saved ``config.yaml`` shows what ran; :func:`selection_record` is what ``metrics.json`` records.
"""

from __future__ import annotations

import copy
import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from metricsearch.utils.config import ConfigError, selection_mode

log = logging.getLogger(__name__)

# The prefix of the per-epoch test evaluations under selection=test_best (never "val": they are not validation).
TEST_EPOCH_PREFIX = "test_epoch"
DESCRIPTIONS = {
    "val": "the checkpoint with the best {monitor} on validation classes held out of training",
    "last": "the last epoch's model, trained on all training classes (no model selection)",
    "test_best": (
        "the best of the per-epoch evaluations on the test classes ({monitor}), trained on all training classes: "
        "the papers' protocol, OPTIMISTIC because the test set chose the model"
    ),
}


def selection_of(cfg: DictConfig) -> str:
    """The run's selection mode, checked.

    Raises:
        ConfigError: not one of :data:`SELECTIONS`, or ``test_best`` in a hyper-parameter search (which would tune
            on the test classes).
    """
    mode = selection_mode(cfg)
    if mode == "test_best" and cfg.get("hparams_search"):
        raise ConfigError(
            "selection=test_best in a hyper-parameter search would tune on the test classes; search with "
            "selection=val (held-out training classes)"
        )
    return mode


def apply_selection(cfg: DictConfig) -> tuple[DictConfig, str]:
    """A copy of ``cfg`` with the settings the selection mode needs, and the mode; ``cfg`` itself is left as it is.

    ``last`` and ``test_best`` train on every training class (``data.val_fraction=0``); ``last`` keeps only the
    latest checkpoint, ``test_best`` evaluates the test classes every epoch under :data:`TEST_EPOCH_PREFIX` and
    monitors the same metric there.
    """
    mode = selection_of(cfg)
    cfg = copy.deepcopy(cfg)
    if mode == "val":
        return cfg, mode
    with open_dict(cfg):
        if OmegaConf.select(cfg, "data.val_fraction", default=0.0):
            log.info("selection=%s trains on every training class: data.val_fraction set to 0", mode)
        cfg.data.val_fraction = 0.0
        checkpoint = OmegaConf.select(cfg, "callbacks.model_checkpoint")
        early_stopping = OmegaConf.select(cfg, "callbacks.early_stopping")
        if mode == "last":
            if checkpoint is not None:
                checkpoint.monitor = None
                checkpoint.filename = "epoch{epoch:03d}"
            if early_stopping is not None:
                log.warning("selection=last has no validation to stop early on: callbacks.early_stopping removed")
                del cfg.callbacks["early_stopping"]
            return cfg, mode
        metric = str(cfg.monitor).split("/", 1)[-1]
        cfg.monitor = f"{TEST_EPOCH_PREFIX}/{metric}"
        cfg.data.validate_on_test = True
        cfg.module.val_prefix = TEST_EPOCH_PREFIX
        if checkpoint is not None:
            checkpoint.monitor = cfg.monitor
            checkpoint.filename = (
                "epoch{epoch:03d}-step{step}-test-" + metric.replace("@", "") + "-{" + cfg.monitor + ":.4f}"
            )
        if early_stopping is not None:
            early_stopping.monitor = cfg.monitor
    return cfg, mode


def fall_back_to_last(cfg: DictConfig, reason: str) -> tuple[DictConfig, str]:
    """A copy of ``cfg`` switched to ``selection=last`` (logged) for a run that cannot select on validation classes,
    and the mode; ``cfg`` itself is left as it is."""
    log.warning("selection=last: %s, so the last epoch's model is tested (no checkpoint selection)", reason)
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        cfg.selection = "last"
    switched, mode = apply_selection(cfg)
    OmegaConf.set_readonly(switched, True)
    return switched, mode


def selection_record(mode: str, monitor: str) -> dict[str, object]:
    """What ``metrics.json`` records of the selection: the mode, whether it is optimistic, and what it means."""
    return {"mode": mode, "optimistic": mode == "test_best", "description": DESCRIPTIONS[mode].format(monitor=monitor)}
