"""Small helpers around Hydra / OmegaConf configs."""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metricsearch.utils.errors import error_message

log = logging.getLogger(__name__)

# The checkout: train.py, conf/, scripts/ (the package is installed from it in editable mode).
REPO_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO_ROOT / "conf"
# Groups whose absence is a valid choice; `group=null` on the command line selects the group's `none` option.
NULLABLE_GROUPS = ("miner", "scheduler", "sampler", "logger")


def normalize_overrides(args: Sequence[str]) -> list[str]:
    """Rewrites ``miner=null`` into ``miner=none`` and ``data.root=PATH`` into ``data.source.root=PATH``, after
    checking every config-group option (:func:`check_group_options`).

    Hydra 1.3 rejects a null value for a config group on the command line ("Config group override must be a
    string or a list"), yet ``miner=null`` is what a user types to switch the miner off.

    Raises:
        ConfigError: a group option is a path, or not an option of its group.
    """
    check_group_options(args)
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "data.root":
            key = "data.source.root"  # shorthand: every dataset reader takes its folder as `root`
        if sep and key.lstrip("+") in NULLABLE_GROUPS:
            value = ",".join("none" if v.strip() == "null" else v for v in value.split(","))
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out


# What an option name may not contain: it names a YAML file of its group's folder, never a path to one elsewhere.
_PATH_MARKS = ("/", "\\", "..")


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str] | None:
    """The options of a config group (``loss`` -> ``arcface, ..., triplet``), or None if ``group`` is not one."""
    folder = config_dir / group
    if not group or not group.replace("_", "").isalnum() or not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_group_options(args: Sequence[str], config_dir: Path = CONFIG_DIR) -> None:
    """Refuses a config-group option that is a path, or that its group does not have, before Hydra composes.

    An option name is a name: ``experiment=../../elsewhere/evil`` would make Hydra load a YAML file from outside
    ``conf/``. Hydra's own groups (``hydra/launcher=...``) and sweep expressions (``loss=glob(*)``) are checked
    for path characters only; a comma-separated sweep (``loss=triplet,contrastive``) option by option.

    Raises:
        ConfigError: one line naming the option and listing the group's options.
    """
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            continue
        group = key.lstrip("+~").partition("@")[0]
        options = group_options(group, config_dir)
        if options is None and "/" not in group:
            continue  # a setting (seed=1, data.root=PATH), not a group
        names = [value] if options is None or "(" in value else [v.strip() for v in value.split(",")]
        listed = f"conf/{group} ({', '.join(options)})" if options else f"the {group} group"
        for name in names:
            if any(mark in name for mark in _PATH_MARKS):
                raise ConfigError(f"{group}={name} is a path, not an option name: name one of the options of {listed}")
            if options is not None and "(" not in value and name not in options and name not in ("null", ""):
                raise ConfigError(f"{group}={name} is not an option of {listed}")


def instantiate_partial_with(cfg: DictConfig | dict | None, **runtime: Any) -> Any:
    """Instantiates ``cfg`` and, when it is a partial, completes it with the runtime values its target accepts.

    Losses need ``num_classes`` and ``embedding_size`` only if they have proxies or class weights; passing
    exactly the arguments the constructor takes keeps every loss config free of runtime values.
    """
    if cfg is None:
        return None
    obj = instantiate(cfg)
    if not isinstance(obj, functools.partial):
        return obj
    accepted = _constructor_parameters(obj.func)
    return obj(**{k: v for k, v in runtime.items() if k in accepted and k not in obj.keywords})


def to_plain(cfg: DictConfig | None) -> Any:
    """A resolved plain-Python copy of ``cfg`` (for JSON, checkpoints and loggers)."""
    return None if cfg is None else OmegaConf.to_container(cfg, resolve=True)


def _constructor_parameters(target: Any) -> set[str]:
    """Names a class (or function) accepts, following ``*args, **kwargs`` up the class hierarchy.

    Some losses (e.g. CosFaceLoss) declare only their own arguments and forward the rest to a parent class.
    """
    if not inspect.isclass(target):
        return set(inspect.signature(target).parameters)
    names: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


class ConfigError(ValueError):
    """A setting that cannot work, found before any work is done; the message names it and what to set instead."""


class UserError(CompactHydraException):
    """A problem the user can fix; Hydra prints its message without a traceback (under ``-m``: for each job)."""


# Exit status of a single run stopped by a problem the user can fix (as the search scripts use).
USER_ERROR_EXIT = 2


@contextmanager
def report_user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Reports the given exceptions, and a full disk, as their one-line message instead of a stack trace.

    Used around the work of an entry point (``train.py``): a mistake in the config or a damaged checkpoint is
    reported as what to change. A single run prints ``error: <message>`` on stderr and exits with status 2; in a
    multirun (``-m``, Optuna) a :class:`UserError` is raised instead, so Hydra names the job's overrides and a
    sweeper can record the failed trial and go on. The message also goes to the run's log file.
    """
    try:
        yield
    except Exception as err:
        # hydra.utils.instantiate wraps what a target raises (a backbone's missing weights) in its own exception.
        cause = _wrapped_user_error(err, kinds)
        if cause is None:
            raise
        # What _wrapped_user_error found is one of `kinds` or, failing that, a full disk.
        if isinstance(cause, kinds):
            message = error_message(cause)
        else:
            message = f"disk full: {cause}; free space there or point hydra.run.dir at a disk with room"
    else:
        return
    log.error(message)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    raise UserError(message) from None


def _wrapped_user_error(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``err`` or the exception it wraps (through ``__cause__``, a few levels) when it is one to report briefly."""
    for _ in range(4):
        if isinstance(err, kinds) or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
            return err
        if err.__cause__ is None:
            return None
        err = err.__cause__
    return None


_NOT_SET = object()


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# How a run's tested model is chosen (see metricsearch.pipelines.selection).
SELECTIONS = ("val", "last", "test_best")
# Seeds go to numpy, torch and Python's random; numpy takes 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1
# Whole-number settings: (key, smallest valid value, example shown in the message).
_WHOLE_NUMBERS = (
    ("seed", 0, 42),
    ("data.batch_size", 1, 64),
    ("data.eval_batch_size", 1, 256),
    ("data.num_workers", 0, 2),
    ("data.image_size", 1, 224),
    ("data.resize_size", 1, 256),
    ("head.embedding_dim", 1, 128),
    ("trainer.max_epochs", -1, 10),
    ("module.max_nonfinite_steps", 1, 10),
    ("module.warmup_epochs", 0, 5),
    ("module.xbm_memory_size", 0, 8192),
    ("module.xbm_start_step", 0, 1000),
)
# Number settings: (key, smallest valid value, whether the smallest is excluded, example).
_NUMBERS = (
    ("optimizer.lr", 0.0, True, 0.001),
    ("optimizer.weight_decay", 0.0, False, 0.0001),
    ("optimizer.momentum", 0.0, False, 0.9),
    ("loss.lr_multiplier", 0.0, True, 1.0),
    ("module.lr_multipliers.backbone", 0.0, False, 1.0),
    ("module.lr_multipliers.head", 0.0, False, 1.0),
    ("data.val_fraction", 0.0, False, 0.2),
)
# Settings that may be left out (null) without it being a mistake.
_NULLABLE = {"data.resize_size", "trainer.max_epochs"}


def validate_config(cfg: DictConfig) -> None:
    """Checks the settings whose mistakes would otherwise surface late, deep inside training, as a stack trace.

    Runs right after composing, before any data, model or trainer is built: numbers that are not numbers or out
    of range, an m-per-class sampler whose ``m`` does not fit the batch size, checkpoints that do not exist.
    What only the data can tell (``sampler.m`` larger than the smallest class) is checked once the data is loaded.

    Raises:
        ConfigError: the first impossible setting, in one line that names it and what to set instead.
    """
    for key, minimum, example in _WHOLE_NUMBERS:
        value = OmegaConf.select(cfg, key, default=_NOT_SET)
        if value is _NOT_SET or (value is None and key in _NULLABLE):
            continue
        if not _is_whole(value):
            raise ConfigError(f"{key}={_shown(value)} is not a whole number; set e.g. {key}={example}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}={value} must be at least {minimum}; set e.g. {key}={example}")
        if key == "seed" and value > MAX_SEED:
            raise ConfigError(f"seed={value} is over {MAX_SEED} (numpy's largest seed, 2**32 - 1); set e.g. seed=42")
    for key, minimum, exclusive, example in _NUMBERS:
        value = OmegaConf.select(cfg, key, default=_NOT_SET)
        if value is _NOT_SET:
            continue
        if not _is_number(value):
            raise ConfigError(f"{key}={_shown(value)} is not a number; set e.g. {key}={example}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number; set e.g. {key}={example}")
        if value < minimum or (exclusive and value == minimum):
            bound = "greater than" if exclusive else "at least"
            raise ConfigError(f"{key}={value} must be {bound} {minimum:g}; set e.g. {key}={example}")
    fraction = OmegaConf.select(cfg, "data.val_fraction", default=None)
    if fraction is not None and fraction >= 1:
        raise ConfigError(
            f"data.val_fraction={fraction} must be below 1 (it is the share of training classes held out for "
            "validation); set e.g. data.val_fraction=0.2"
        )
    _validate_sampler(cfg)
    _validate_training_options(cfg)
    _validate_selection(cfg, fraction)
    _validate_folds(cfg)
    if OmegaConf.select(cfg, "monitor_mode", default="max") not in ("min", "max"):
        raise ConfigError(f"monitor_mode={_shown(cfg.monitor_mode)} must be min or max")
    for key in ("ckpt_path", "resume"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or (key == "resume" and value == "auto"):
            continue
        if not isinstance(value, str) or not Path(value).is_file():
            choices = "a checkpoint file (a run's checkpoints/last.ckpt) or null to start afresh"
            if key == "resume":
                choices = "null (start afresh), auto (continue an unfinished run of this config) or a checkpoint file"
            raise ConfigError(f"{key}={_shown(value)} does not exist; {key} takes {choices}")


def selection_mode(cfg: DictConfig) -> str:
    """The config's ``selection`` (``val`` when unset), one of :data:`SELECTIONS`, or :class:`ConfigError`."""
    selection = OmegaConf.select(cfg, "selection", default=None) or "val"
    if selection not in SELECTIONS:
        raise ConfigError(
            f"selection={_shown(selection)} is not one of {', '.join(SELECTIONS)}; set e.g. selection=val"
        )
    return selection


def _validate_selection(cfg: DictConfig, val_fraction: float | None) -> None:
    """``selection`` is one of :data:`SELECTIONS`, and ``val`` has validation classes to select on."""
    selection = selection_mode(cfg)
    folds = OmegaConf.select(cfg, "data.num_folds", default=0)
    if selection == "val" and val_fraction is not None and val_fraction <= 0 and not folds:
        raise ConfigError(
            "selection=val chooses the checkpoint on held-out training classes, but data.val_fraction=0 holds none "
            "out: set data.val_fraction=0.2, or selection=last to train on every class and test the final model"
        )


def _validate_folds(cfg: DictConfig) -> None:
    """``data.num_folds`` is 0 or K >= 2 and ``data.fold`` one of 0..K-1; ``save_test_embeddings`` needs ``test``."""
    num_folds = OmegaConf.select(cfg, "data.num_folds", default=0)
    fold = OmegaConf.select(cfg, "data.fold", default=0)
    if not _is_whole(num_folds) or num_folds < 0 or num_folds == 1:
        raise ConfigError(
            f"data.num_folds={_shown(num_folds)} must be 0 (hold out data.val_fraction of the training classes) or "
            "2 or more class-disjoint folds; set e.g. data.num_folds=4"
        )
    if num_folds and (not _is_whole(fold) or not 0 <= fold < num_folds):
        raise ConfigError(
            f"data.fold={_shown(fold)} is not a fold of data.num_folds={num_folds}; set 0..{num_folds - 1}"
        )
    if not _is_whole(OmegaConf.select(cfg, "data.fold_seed", default=0)):
        raise ConfigError(
            f"data.fold_seed={_shown(cfg.data.fold_seed)} is not a whole number; set e.g. data.fold_seed=0"
        )
    if OmegaConf.select(cfg, "save_test_embeddings", default=False) and not OmegaConf.select(cfg, "test", default=True):
        raise ConfigError("save_test_embeddings=true writes the test evaluation's embeddings, but test=false skips it")


def _validate_training_options(cfg: DictConfig) -> None:
    """The scheduler's interval, the parts that take a learning-rate multiplier, the XBM memory and DDP warm-up."""
    interval = OmegaConf.select(cfg, "scheduler.interval", default="epoch")
    if interval not in ("epoch", "step", "validation"):
        raise ConfigError(
            f"scheduler.interval={_shown(interval)} must be epoch, step or validation (when the scheduler steps; with "
            "step its milestones count iterations; validation is for a plateau scheduler)"
        )
    multipliers = OmegaConf.select(cfg, "module.lr_multipliers", default=None) or {}
    unknown = sorted(set(multipliers) - {"backbone", "head"})
    if unknown:
        raise ConfigError(
            f"module.lr_multipliers.{unknown[0]} is not a part of the model: the keys are backbone and head (the "
            "loss's parameters take loss.lr_multiplier)"
        )
    memory = OmegaConf.select(cfg, "module.xbm_memory_size", default=0)
    batch_size = OmegaConf.select(cfg, "data.batch_size", default=None)
    if memory and _is_whole(batch_size) and memory < batch_size:
        raise ConfigError(
            f"module.xbm_memory_size={memory} is smaller than data.batch_size={batch_size}: the memory holds whole "
            f"batches (of every process under DDP); set e.g. module.xbm_memory_size={max(8192, batch_size * 8)}"
        )
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if (
        OmegaConf.select(cfg, "module.warmup_epochs", default=0)
        and isinstance(strategy, str)
        and strategy.startswith("ddp")
        and "find_unused_parameters_true" not in strategy
    ):
        raise ConfigError(
            f"module.warmup_epochs with trainer.strategy={strategy}: DDP needs to be told that the frozen backbone "
            "gets no gradient during the warm-up; set trainer.strategy=ddp_find_unused_parameters_true"
        )


def _validate_sampler(cfg: DictConfig) -> None:
    """An m-per-class batch holds ``m`` images of each of ``batch_size / m`` classes: m must divide the batch."""
    m = OmegaConf.select(cfg, "sampler.m", default=None)
    batch_size = OmegaConf.select(cfg, "data.batch_size", default=None)
    if m is None or batch_size is None:
        return
    if not _is_whole(m):
        raise ConfigError(f"sampler.m={_shown(m)} is not a whole number; set e.g. sampler.m=4")
    if m < 1:
        raise ConfigError(f"sampler.m={m} must be at least 1 (images of each class in a batch); set e.g. sampler.m=4")
    # Divisors of the batch that leave at least two classes per batch, nearest the usual m=4 first.
    divisors = sorted((d for d in range(2, batch_size // 2 + 1) if batch_size % d == 0), key=lambda d: (abs(d - 4), d))
    if m > batch_size:
        if divisors:
            fix = f"lower sampler.m to a divisor of {batch_size}, e.g. sampler.m={divisors[0]}"
        else:
            fix = "lower sampler.m and make data.batch_size a multiple of it, e.g. sampler.m=4 data.batch_size=8"
        raise ConfigError(
            f"sampler.m={m} is larger than data.batch_size={batch_size}: every batch holds m images of each of "
            f"batch_size/m classes; {fix}"
        )
    if batch_size % m:
        multiple = m * max(2, round(batch_size / m))
        fix = f"set data.batch_size to a multiple of {m} (e.g. data.batch_size={multiple})"
        if divisors:
            fix += f" or sampler.m to a divisor of {batch_size} (e.g. sampler.m={divisors[0]})"
        raise ConfigError(
            f"data.batch_size={batch_size} is not divisible by sampler.m={m}: every batch holds m images of each "
            f"of batch_size/m classes; {fix}"
        )
