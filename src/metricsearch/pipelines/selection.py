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
# What each supervision (conf/supervision) trained on, and what its validation held out, for the description of
# the selection in metrics.json. The validation of a closed-set dataset (test images of the training classes) is
# images of the training classes; otherwise whole classes.
TRAINED_ON = {
    "class": "trained on all training classes",
    "pairs": "trained on the pairs of data.pairs_file only (no class label)",
    "triplets": "trained on the triplets of data.triplets_file only (no class label)",
    "none": "trained on all training images without their labels",
}
VALIDATED_ON = {
    ("class", False): "validation classes held out of training",
    ("class", True): "validation images held out of every training class",
    ("tuples", False): "the labelled training classes of which data.{supervision}_file names no image",
    ("tuples", True): "the labelled training images data.{supervision}_file does not name",
    ("none", False): "labelled validation classes held out of training",
    ("none", True): "labelled validation images held out of every training class",
}


def _validated_on(supervision: str, closed_set: bool) -> str:
    kind = "tuples" if supervision in ("pairs", "triplets") else supervision
    held_out = VALIDATED_ON[kind, closed_set].format(supervision=supervision)
    if supervision != "class":
        held_out += " (their labels read only to evaluate)"
    return held_out


def describe_selection(
    mode: str, monitor: str, supervision: str = "class", closed_set: bool = False, reason: str | None = None
) -> str:
    """What selected the reported model, and what it was trained on, as ``metrics.json`` says it.

    Args:
        mode: the selection mode (``val``, ``last`` or ``test_best``).
        monitor: the metric that selects.
        supervision: what training read (``class``, ``pairs``, ``triplets`` or ``none``).
        closed_set: whether validation holds out images of the training classes rather than whole classes.
        reason: why a run that asked for ``val`` tests the last model instead (:func:`fall_back_to_last`).
    """
    trained_on = TRAINED_ON[supervision]
    if mode == "val":
        held_out = _validated_on(supervision, closed_set)
        if supervision == "class":
            return f"the checkpoint with the best {monitor} on {held_out}"
        return f"the checkpoint with the best {monitor} on {held_out}, {trained_on}"
    if mode == "last":
        return f"the last epoch's model, {trained_on} (no model selection{': ' + reason if reason else ''})"
    return (
        f"the best of the per-epoch evaluations on the test classes ({monitor}), {trained_on}: the papers' "
        "protocol, OPTIMISTIC because the test set chose the model"
    )


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


def apply_selection(cfg: DictConfig, announce: bool = True) -> tuple[DictConfig, str]:
    """A copy of ``cfg`` with the settings the selection mode needs, and the mode; ``cfg`` itself is left as it is.

    ``last`` and ``test_best`` train on every training class (``data.val_fraction=0``); ``last`` keeps only the
    latest checkpoint, ``test_best`` evaluates the test classes every epoch under :data:`TEST_EPOCH_PREFIX` and
    monitors the same metric there.

    Args:
        announce: log that ``data.val_fraction`` is set to 0 (false where the data is already built and the
            caller says what happened).
    """
    mode = selection_of(cfg)
    cfg = copy.deepcopy(cfg)
    if mode == "val":
        return cfg, mode
    with open_dict(cfg):
        if announce and OmegaConf.select(cfg, "data.val_fraction", default=0.0):
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
    """A copy of ``cfg`` switched to ``selection=last`` for a run whose data, once built, has nothing to select on,
    and the mode; ``cfg`` itself is left as it is.

    One warning says so; the copy's ``data.val_fraction`` is 0, so that its saved config rebuilds the same data.
    """
    log.warning("selection=last: %s, so the last epoch's model is tested (no checkpoint selection)", reason)
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        cfg.selection = "last"
    switched, mode = apply_selection(cfg, announce=False)
    OmegaConf.set_readonly(switched, True)
    return switched, mode


def selection_record(
    mode: str, monitor: str, supervision: str = "class", closed_set: bool = False, reason: str | None = None
) -> dict[str, object]:
    """What ``metrics.json`` records of the selection: the mode, whether it is optimistic, what it means
    (:func:`describe_selection`), and why a run fell back to ``last`` when it did."""
    record: dict[str, object] = {
        "mode": mode,
        "optimistic": mode == "test_best",
        "description": describe_selection(mode, monitor, supervision, closed_set, reason),
    }
    if reason is not None:
        record["fallback_reason"] = reason
    return record
