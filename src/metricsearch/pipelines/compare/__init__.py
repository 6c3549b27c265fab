"""``make compare``: a fair loss comparison, the protocol of "A Metric Learning Reality Check" made practical.

Musgrave, Belongie and Lim (ECCV 2020) showed that most published gaps between losses vanish once every loss gets
the same tuning budget on validation data that never touches the test classes. Per dataset and loss:

1. **Search.** An Optuna study (TPE, seeded) of ``trials`` trials. A trial is one setting of the loss's own
   parameters (and its miner's; the space is ``conf/compare/<loss>.yaml``); everything else is shared by every loss
   (``conf/compare/protocol.yaml``). The training classes are split into K class-disjoint folds
   (``data.num_folds=K``); the trial trains K models, fold k validated on fold k (``data.fold=k``) with ``test=false``
   (the test classes are never evaluated), and its objective is the mean over folds of the validation MAP@R of the
   checkpoint each run selects (``metrics.json`` ``val_best``). ``prune=true`` stops a trial after its first fold
   when that fold is below the median of the others (Optuna's MedianPruner).
2. **Final runs.** The best setting (among the first ``trials`` finished trials, so every loss has the same budget
   even when parallel workers overshoot) trains again K folds x S seeds, now tested once on the test classes with
   ``save_test_embeddings=true``; the loss's default parameters get the same runs (the default-parameter baseline).
3. **Results** in ``<results_dir>`` (``results/compare/``): ``compare.md`` (per dataset, one table per metric: tuned
   separate mean ± 95% CI over the K x S models, tuned concatenated (the K fold models' embeddings concatenated per
   seed) ± CI over seeds, default separate ± CI, and the losses statistically indistinguishable from the best by
   Welch's t-test), ``trials.csv``, ``runs.csv``, ``summary.csv``, and per dataset ``intervals.png`` and each loss's
   ``search_history.png``.

Every run is one ``python train.py ...`` subprocess with its own run folder (through
:func:`metricsearch.pipelines.reproduce.run_cell`, as ``make reproduce``), so every number is traceable to a folder
holding its ``config.yaml`` and ``metrics.json``:

- search: ``<results_dir>/<dataset>/<loss>/search/<params key>/fold<k>``, the key a hash of the trial's parameters;
- final: ``<results_dir>/<dataset>/<loss>/final/{tuned-<params key>,default}/seed<s>/fold<k>``.

Resumable at every level: the studies live in an Optuna storage (``sqlite:///<results_dir>/optuna.db`` unless
``storage=`` names another database); a fold run whose folder has its ``metrics.json`` is skipped, one interrupted
mid-way continues from its ``last.ckpt``; a trial whose process died is failed and retried with the same parameters
(so its finished folds are reused): on this machine at once (its process is gone), elsewhere once its heartbeat
stops (Optuna's RDBStorage heartbeat and RetryFailedTrialCallback). Several processes or machines can work on one
study through one database URL; ``workers=N`` runs N trials at once here.

Its command line is :mod:`metricsearch.cli.compare`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shlex
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metricsearch.analysis.files import save_figure, write_csv
from metricsearch.analysis.results import metric_title, recall_keys
from metricsearch.pipelines.reproduce import (
    COMMON_OVERRIDES,
    dataset_availability,
    is_finished,
    run_cell,
)
from metricsearch.utils.atomic_io import atomic_write_text
from metricsearch.utils.config import CONFIG_DIR, REPO_ROOT, ConfigError, normalize_overrides

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

SPACE_DIR = CONFIG_DIR / "compare"
PROTOCOL_FILE = SPACE_DIR / "protocol.yaml"
# The metrics of the tables, one table each; the CSVs hold every metric the runs logged.
TABLE_METRICS = ("recall@1", "map@r", "r_precision")
TEST_EMBEDDINGS = "test_embeddings.npz"
SEARCH, TUNED, DEFAULT = "search", "tuned", "default"
# Trials that used their budget: finished (COMPLETE) or stopped as hopeless after their first fold (PRUNED).
FINISHED_STATES = ("COMPLETE", "PRUNED")
_PARAM_KINDS = ("float", "int", "categorical")


class CompareError(ConfigError):
    """A comparison that cannot run as asked (a search space, a study run with other settings, failing trials)."""


# ----------------------------------------------------------------------------------------------------------------
# Search spaces and the protocol's settings (conf/compare/)


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a Hydra key and its range (``low``..``high``, log-uniform when ``log``) or choices."""

    name: str
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """A loss's search space: its conf/loss name, its parameters, and overrides every run of it gets (a miner's
    margin tied to the loss's, say)."""

    loss: str
    params: tuple[ParamSpec, ...]
    overrides: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "params": [asdict(p) for p in self.params], "overrides": list(self.overrides)}


def parse_search_space(loss: str, mapping: Mapping[str, Any], source: str = "") -> SearchSpace:
    """A :class:`SearchSpace` from the mapping of a ``conf/compare/<loss>.yaml`` file.

    Each parameter is ``KEY: {low: A, high: B}`` (a float; ``log: true`` for log-uniform, ``type: int`` for an
    integer) or ``KEY: {choices: [...]}``.

    Raises:
        CompareError: a malformed entry, naming the file, the parameter and what to write instead.
    """
    where = source or f"conf/compare/{loss}.yaml"
    params = []
    for name, spec in (mapping.get("params") or {}).items():
        if not isinstance(spec, Mapping):
            raise CompareError(f"{where}: parameter {name} must be a mapping like {{low: 0.0, high: 1.0}}")
        kind = str(spec.get("type", "categorical" if "choices" in spec else "float"))
        if kind not in _PARAM_KINDS:
            raise CompareError(f"{where}: parameter {name} has type {kind}; use one of {', '.join(_PARAM_KINDS)}")
        if kind == "categorical":
            choices = tuple(spec.get("choices") or ())
            if not choices:
                raise CompareError(f"{where}: parameter {name} needs a non-empty choices list")
            params.append(ParamSpec(name, kind, choices=choices))
            continue
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except (KeyError, TypeError, ValueError):
            raise CompareError(
                f"{where}: parameter {name} needs numbers low and high, e.g. {{low: 0.0, high: 1.0}}"
            ) from None
        log = bool(spec.get("log", False))
        if not low < high or (log and low <= 0):
            raise CompareError(
                f"{where}: parameter {name} has low={low}, high={high}; low must be below high (and above 0 "
                "with log: true)"
            )
        params.append(ParamSpec(name, kind, low, high, log))
    if not params:
        raise CompareError(f"{where} searches no parameters; add some under params:")
    overrides = tuple(str(o) for o in mapping.get("overrides") or ())
    return SearchSpace(str(mapping.get("loss") or loss), tuple(params), overrides)


def load_search_space(loss: str, space_dir: Path = SPACE_DIR) -> SearchSpace:
    """The search space of ``loss`` from ``conf/compare/<loss>.yaml``.

    Raises:
        CompareError: no such file (the message lists the losses that have one).
    """
    path = space_dir / f"{loss}.yaml"
    if not path.is_file():
        known = ", ".join(available_losses(space_dir)) or "none"
        raise CompareError(f"no search space for loss {loss} (conf/compare/{loss}.yaml); losses with one: {known}")
    mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return parse_search_space(
        loss, mapping, source=str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
    )


def available_losses(space_dir: Path = SPACE_DIR) -> list[str]:
    """The losses with a search space in ``space_dir``."""
    return sorted(p.stem for p in space_dir.glob("*.yaml") if p.name != PROTOCOL_FILE.name)


def sample_params(trial: optuna.trial.BaseTrial, space: SearchSpace) -> dict[str, Any]:
    """The trial's setting of every parameter of ``space`` (Optuna's suggest calls, named by the Hydra key)."""
    params: dict[str, Any] = {}
    for p in space.params:
        if p.kind == "categorical":
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    return params


def params_key(params: Mapping[str, Any]) -> str:
    """A short hash naming a parameter setting's folder: equal settings (in any order) share it.

    Example:
        >>> params_key({"loss.margin": 0.1}) == params_key({"loss.margin": 0.1})
        True
    """
    canonical = json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:12]


def param_overrides(params: Mapping[str, Any]) -> list[str]:
    """Hydra overrides setting ``params`` (floats in full precision, so a run's config matches its trial)."""
    return [f"{key}={_override_value(value)}" for key, value in params.items()]


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Protocol:
    """The comparison's settings: ``conf/compare/protocol.yaml`` with the command line's values applied."""

    losses: tuple[str, ...]
    datasets: tuple[str, ...]
    trials: int
    folds: int
    seeds: tuple[int, ...]
    search_seed: int = 0
    epochs: int | None = None
    synthetic_epochs: int | None = None
    image_size: int | None = None
    monitor: str = "val/map@r"
    workers: int = 1
    prune: bool = False
    prune_startup_trials: int = 3
    sampler_seed: int = 0
    startup_trials: int = 4
    storage: str | None = None
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 3
    max_failures: int = 3
    include_default: bool = False
    dataset_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def epochs_for(self, dataset: str) -> int | None:
        if self.epochs is not None:
            return self.epochs
        return self.synthetic_epochs if dataset == "synthetic" else None


def load_protocol(path: Path = PROTOCOL_FILE, **values: Any) -> Protocol:
    """The protocol of ``path`` with ``values`` (the command line's; None: keep the file's) applied.

    Raises:
        CompareError: a value that cannot work (fewer than 2 folds, no trials, no seeds, no workers).
    """
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    raw.update({k: v for k, v in values.items() if v is not None})
    known = {f for f in Protocol.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CompareError(f"{path.name}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    raw["losses"] = tuple(raw.get("losses") or ())
    raw["datasets"] = tuple(raw.get("datasets") or ())
    raw["seeds"] = tuple(int(s) for s in raw.get("seeds") or ())
    raw["dataset_overrides"] = {k: tuple(v or ()) for k, v in (raw.get("dataset_overrides") or {}).items()}
    protocol = Protocol(**raw)
    if protocol.trials < 1:
        raise CompareError(f"trials={protocol.trials}: a study needs at least 1 trial per loss")
    if protocol.folds < 2:
        raise CompareError(f"folds={protocol.folds}: cross-validation needs at least 2 class-disjoint folds (e.g. 4)")
    if not protocol.seeds:
        raise CompareError("seeds= is empty: the final runs need at least one seed, e.g. seeds=0")
    if protocol.workers < 1:
        raise CompareError(f"workers={protocol.workers}: at least 1 worker")
    return protocol


# ----------------------------------------------------------------------------------------------------------------
# Fold runs


@dataclass(frozen=True)
class FoldRun:
    """One training run of the protocol: a search fold of a trial, or a final fold of the tuned or default setting."""

    dataset: str
    loss: str
    kind: str
    fold: int
    seed: int
    key: str = ""

    def folder(self, results_dir: Path) -> Path:
        base = Path(results_dir) / self.dataset / self.loss
        if self.kind == SEARCH:
            return base / SEARCH / self.key / f"fold{self.fold}"
        setting = f"{TUNED}-{self.key}" if self.kind == TUNED else DEFAULT
        return base / "final" / setting / f"seed{self.seed}" / f"fold{self.fold}"

    def __str__(self) -> str:
        what = f"trial {self.key}" if self.kind == SEARCH else f"{self.kind} seed {self.seed}"
        return f"{self.dataset} / {self.loss} / {what} / fold {self.fold}"


def uses_wandb(extra: Sequence[str]) -> bool:
    """Whether ``extra`` switches W&B logging on (``logger=wandb``, or ``logger=many`` which includes it)."""
    for override in extra:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "logger" and value in ("wandb", "many"):
            return True
    return False


def run_overrides(
    run: FoldRun,
    protocol: Protocol,
    space_overrides: Sequence[str],
    params: Mapping[str, Any],
    results_dir: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """The Hydra overrides of one fold run: shared settings, the dataset's, the loss and its setting, the fold and
    seed, the test (final runs only), then the user's extras last."""
    overrides = [*COMMON_OVERRIDES, f"monitor={protocol.monitor}"]
    epochs = protocol.epochs_for(run.dataset)
    if epochs is not None:
        overrides.append(f"trainer.max_epochs={epochs}")
    if protocol.image_size is not None:
        overrides.append(f"data.image_size={protocol.image_size}")
        if run.dataset == "synthetic":
            overrides += [f"data.source.image_size={protocol.image_size}", f"data.resize_size={protocol.image_size}"]
    overrides += protocol.dataset_overrides.get(run.dataset, ())
    overrides += [f"data={run.dataset}", f"loss={run.loss}", *space_overrides, *param_overrides(params)]
    overrides += [f"data.num_folds={protocol.folds}", f"data.fold={run.fold}", f"seed={run.seed}"]
    # The search never evaluates the test classes; the final runs test once and keep their embeddings.
    overrides += ["test=false"] if run.kind == SEARCH else ["test=true", "save_test_embeddings=true"]
    if uses_wandb(extra):
        job = SEARCH if run.kind == SEARCH else "final"
        name = f"{run.loss}-{run.kind}-{run.key or 'default'}-seed{run.seed}-fold{run.fold}"
        overrides += [
            f"logger.wandb.group={run.dataset}/{run.loss}",
            f"logger.wandb.job_type={job}",
            f"logger.wandb.name={name}",
        ]
    overrides.append(f"hydra.run.dir={run.folder(results_dir).resolve()}")
    return overrides + list(extra)


def validation_score(folder: Path, monitor: str) -> float | None:
    """The monitored validation value of the checkpoint a finished run selected (``metrics.json`` ``val_best``)."""
    try:
        summary = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        return float(summary["metrics"]["val_best"][monitor.split("/", 1)[1]])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def final_finished(folder: Path) -> bool:
    """A final run is finished when it wrote its test metrics and its test embeddings."""
    return is_finished(folder) and (folder / TEST_EMBEDDINGS).is_file()


class FoldRunFailed(RuntimeError):
    """A fold run's ``python train.py`` failed; its log is named in the message."""


@dataclass
class Context:
    """What every fold run of one comparison shares."""

    protocol: Protocol
    results_dir: Path
    extra: tuple[str, ...]
    timeout: float | None
    console: Console
    lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, message: str) -> None:
        with self.lock:
            self.console.print(message, highlight=False)


def ensure_run(run: FoldRun, space: SearchSpace, params: Mapping[str, Any], ctx: Context) -> Path:
    """Trains ``run`` unless its folder is finished; returns the folder.

    Raises:
        FoldRunFailed: the training subprocess failed.
    """
    folder = run.folder(ctx.results_dir)
    finished = (
        (lambda f: validation_score(f, ctx.protocol.monitor) is not None) if run.kind == SEARCH else final_finished
    )
    if finished(folder):
        ctx.say(f"skip   {run} (finished)")
        return folder
    overrides = run_overrides(run, ctx.protocol, space.overrides, params, ctx.results_dir, ctx.extra)
    ok, seconds = run_cell(run, overrides, folder, ctx.timeout, finished=finished)
    if not ok:
        raise FoldRunFailed(f"{run} failed after {seconds:.0f} s: see {folder / 'reproduce.log'}")
    if run.kind == SEARCH:
        # A search run's checkpoints serve no later step (only its validation score does): free the disk.
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        score = validation_score(folder, ctx.protocol.monitor)
        ctx.say(f"done   {run} in {seconds:.0f} s ({ctx.protocol.monitor} {score:.4f})")
    else:
        ctx.say(f"done   {run} in {seconds:.0f} s")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The search: one Optuna study per dataset and loss


def study_name(dataset: str, loss: str) -> str:
    return f"{dataset}/{loss}"


def default_storage(results_dir: Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve() / 'optuna.db'}"


def open_storage(url: str, protocol: Protocol) -> optuna.storages.RDBStorage:
    """The RDB storage of the studies, with heartbeats: a trial whose process stops beating for ``grace_period``
    seconds is failed and retried with the same parameters (up to ``max_retry`` times)."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=protocol.heartbeat_interval,
            grace_period=protocol.grace_period,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=protocol.max_retry),
        )


def search_fingerprint(dataset: str, space: SearchSpace, protocol: Protocol, extra: Sequence[str]) -> dict[str, Any]:
    """What gives a trial's objective its meaning; a study refuses to continue under other settings.

    The number of trials, the seeds of the final runs and the workers may change between runs (a study can be
    extended); logger settings do not change what is measured.
    """
    template = FoldRun(dataset, space.loss, SEARCH, 0, protocol.search_seed, "KEY")
    overrides = run_overrides(template, protocol, space.overrides, {}, Path("/"), ())
    overrides = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    extra = [o for o in extra if not o.lstrip("+~").startswith("logger")]
    fingerprint: dict[str, Any] = {"space": space.as_dict(), "overrides": overrides, "extra": extra}
    if protocol.include_default:
        # Only when set, so that studies made before this setting existed still match.
        fingerprint["include_default"] = True
    # As the storage gives it back (JSON: tuples become lists), so that equal settings compare equal.
    return json.loads(json.dumps(fingerprint))


def default_params(dataset: str, space: SearchSpace, protocol: Protocol, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The values a run at the loss's defaults has for each searched parameter: the composed training config of
    the search's runs, without any parameter override (what the ``default`` final runs train with).

    Raises:
        CompareError: a parameter is not in the config, or its default lies outside the search space (then a
            trial cannot start there: widen the range, or leave ``include_default`` off).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    template = FoldRun(dataset, space.loss, SEARCH, 0, protocol.search_seed, "KEY")
    overrides = run_overrides(template, protocol, space.overrides, {}, Path("/"), extra)
    overrides = normalize_overrides([o for o in overrides if not o.startswith("hydra.")])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    values: dict[str, Any] = {}
    for p in space.params:
        value = OmegaConf.select(cfg, p.name, default=None)
        if p.kind == "categorical":
            inside = value in p.choices
        else:
            inside = isinstance(value, (int, float)) and not isinstance(value, bool) and p.low <= value <= p.high
        if not inside:
            allowed = f"choices {list(p.choices)}" if p.kind == "categorical" else f"[{p.low}, {p.high}]"
            raise CompareError(
                f"include_default: {space.loss}'s default {p.name}={value} is outside its search space {allowed} "
                f"(conf/compare/{space.loss}.yaml); widen the range there, or set include_default=false"
            )
        values[p.name] = value if p.kind == "categorical" else int(value) if p.kind == "int" else float(value)
    return values


def open_study(
    storage: optuna.storages.BaseStorage, dataset: str, space: SearchSpace, protocol: Protocol, extra: Sequence[str]
) -> optuna.Study:
    """Creates or loads the study of ``dataset`` x ``space.loss``, checking it was run with the same settings.

    Raises:
        CompareError: the stored study was run with other settings (epochs, folds, search space, extras).
    """
    import optuna

    fingerprint = search_fingerprint(dataset, space, protocol, extra)
    study = optuna.create_study(
        storage=storage, study_name=study_name(dataset, space.loss), direction="maximize", load_if_exists=True
    )
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif stored != fingerprint:
        changed = ", ".join(k for k in {**stored, **fingerprint} if fingerprint.get(k) != stored.get(k))
        raise CompareError(
            f"study {study.study_name} was run with other settings ({changed} differ: "
            f"{_first_difference(stored, fingerprint)}); continue it with the same settings, or use another "
            "results_dir= or storage="
        )
    study.set_user_attr("budget", protocol.trials)
    return study


def queue_default_trial(
    study: optuna.Study, dataset: str, space: SearchSpace, protocol: Protocol, extra: Sequence[str] = ()
) -> dict[str, Any] | None:
    """With ``protocol.include_default``, makes a new study's first trial the loss's default setting; returns it
    (None when nothing was queued: the setting is off, or the study has trials already).

    The tuned setting is then never one that did worse on validation than the default, which the search alone may
    never come near (NT-Xent in the measured comparison: its tuned temperature tested below its default).
    """
    if not protocol.include_default or study.get_trials(deepcopy=False):
        return None
    defaults = default_params(dataset, space, protocol, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enqueue_trial is experimental in Optuna 2.10
        study.enqueue_trial(defaults)
    return defaults


def _first_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    for key in {**old, **new}:
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, list) and isinstance(after, list):
            removed = [str(x) for x in before if x not in after]
            added = [str(x) for x in after if x not in before]
            return f"{removed} -> {added}"
        return f"{before} -> {after}"
    return ""


def worker_id() -> str:
    """This process on this machine: host, pid and the process's start time (so a reused pid is not mistaken)."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def _worker_alive(worker: str) -> bool:
    import psutil

    host, _, rest = worker.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        return True  # another machine's trial: its heartbeat tells
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.Error, ValueError):
        return False


def reclaim_dead_trials(study: optuna.Study, grace_period: float = 180.0) -> list[int]:
    """Fails the RUNNING trials of processes of this machine that are gone, and queues their retry.

    Optuna's heartbeat does the same for any machine once ``grace_period`` has passed; a process of this machine
    can be checked at once, so a comparison killed and started again retries its interrupted trial immediately.

    Returns:
        The numbers of the trials reclaimed.
    """
    import optuna

    storage = study._storage
    reclaimed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # The storage's own retry policy (open_storage's max_retry); any retry at all for a storage without one.
        callback = storage.get_failed_trial_callback() or optuna.storages.RetryFailedTrialCallback()
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker")
            if worker:
                dead = not _worker_alive(worker)
            else:
                # Stopped between its creation and its objective's first step, which records the worker within
                # milliseconds: only an old one is known to be dead.
                age = (datetime.datetime.now() - trial.datetime_start).total_seconds() if trial.datetime_start else 0
                dead = age > grace_period
            if not dead or not storage.set_trial_state(trial._trial_id, optuna.trial.TrialState.FAIL):
                continue
            reclaimed.append(trial.number)
            if trial.params:
                before = {t.number for t in study.get_trials(deepcopy=False)}
                callback(study, storage.get_trial(trial._trial_id))
                # The retry is a copy of the trial's attributes: it must not carry the dead process as its worker.
                for retry in study.get_trials(deepcopy=False):
                    if retry.number not in before:
                        storage.set_trial_user_attr(retry._trial_id, "worker", "")
    return reclaimed


def occupied_trials(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Trials that hold a place in the budget: finished, waiting for a retry, or running in a live process (a
    trial stopped before its first step holds none)."""

    def holds(t: optuna.trial.FrozenTrial) -> bool:
        if t.state.name == "RUNNING":
            return bool(t.user_attrs.get("worker")) and _worker_alive(t.user_attrs["worker"])
        return t.state.name in (*FINISHED_STATES, "WAITING")

    return sum(holds(t) for t in trials)


def budget_trials(trials: Sequence[optuna.trial.FrozenTrial], budget: int) -> list[optuna.trial.FrozenTrial]:
    """The first ``budget`` finished (complete or pruned) trials by number: the equal budget of every loss."""
    finished = [t for t in trials if t.state.name in FINISHED_STATES]
    return sorted(finished, key=lambda t: t.number)[:budget]


def best_trial(trials: Sequence[optuna.trial.FrozenTrial], budget: int) -> optuna.trial.FrozenTrial | None:
    """The complete trial of highest objective among the budget's trials (the lowest number wins a tie)."""
    complete = [t for t in budget_trials(trials, budget) if t.state.name == "COMPLETE" and t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def make_objective(dataset: str, space: SearchSpace, ctx: Context):
    """The objective of a trial: train its K folds (each skipped when finished) and return their mean score."""
    import optuna

    protocol = ctx.protocol

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        params = sample_params(trial, space)
        key = params_key(params)
        trial.set_user_attr("key", key)
        values = []
        for fold in range(protocol.folds):
            run = FoldRun(dataset, space.loss, SEARCH, fold, protocol.search_seed, key)
            folder = ensure_run(run, space, params, ctx)
            value = validation_score(folder, protocol.monitor)
            values.append(value)
            trial.set_user_attr(f"fold{fold}", value)
            if protocol.prune and fold == 0:
                trial.report(value, 0)
                if trial.should_prune():
                    ctx.say(f"prune  {dataset} / {space.loss} / trial {trial.number}: first fold {value:.4f}")
                    raise optuna.TrialPruned()
        return float(np.mean(values))

    return objective


def run_search(study: optuna.Study, dataset: str, space: SearchSpace, ctx: Context, on_trial=None) -> None:
    """Runs trials until ``protocol.trials`` of them have finished, with ``protocol.workers`` trials at once.

    Each trial is one ``study.optimize(n_trials=1)`` with a fresh TPE sampler seeded by the study's trial count:
    the search is reproducible from its seed and history, and a rerun never draws the parameters of a finished
    random trial again (a sampler seeded once per process would).

    Raises:
        CompareError: ``max_failures`` trials in a row failed (a setting that cannot run).
    """
    import optuna

    protocol = ctx.protocol
    objective = make_objective(dataset, space, ctx)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=protocol.prune_startup_trials, n_warmup_steps=0)
        if protocol.prune
        else optuna.pruners.NopPruner()
    )
    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED_STATES)
    failures: list[str] = []

    def loop() -> None:
        worker_study = optuna.load_study(study_name=study.study_name, storage=study._storage, pruner=pruner)
        while not failures or len(failures) < protocol.max_failures:
            reclaimed = reclaim_dead_trials(worker_study, protocol.grace_period)
            if reclaimed:
                ctx.say(f"retry  {worker_study.study_name}: trials {reclaimed} of a stopped process, same parameters")
            trials = worker_study.get_trials(deepcopy=False)
            waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
            if sum(t.state in states for t in trials) >= protocol.trials:
                return
            if occupied_trials(trials) >= protocol.trials and not waiting:
                return  # the remaining budget is being used by live trials (other workers)
            worker_study.sampler = optuna.samplers.TPESampler(
                seed=protocol.sampler_seed + len(trials),
                n_startup_trials=protocol.startup_trials,
                constant_liar=protocol.workers > 1,
            )
            worker_study.optimize(
                objective,
                n_trials=1,
                catch=(FoldRunFailed,),
                callbacks=[optuna.study.MaxTrialsCallback(protocol.trials, states=states)],
            )
            last = max(
                (t for t in worker_study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == worker_id()),
                key=lambda t: t.datetime_complete or t.datetime_start,
                default=None,
            )
            if last is not None and last.state == optuna.trial.TrialState.FAIL:
                failures.append(f"trial {last.number}")
            else:
                failures.clear()
            if on_trial is not None:
                on_trial(worker_study)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if protocol.workers == 1:
            loop()
        else:
            threads = [threading.Thread(target=loop, name=f"compare-worker-{i}") for i in range(protocol.workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    if len(failures) >= protocol.max_failures:
        raise CompareError(
            f"study {study.study_name}: {len(failures)} trials in a row failed ({', '.join(failures)}); see the "
            "reproduce.log of their fold runs"
        )


# ----------------------------------------------------------------------------------------------------------------
# Final runs


def final_runs(dataset: str, loss: str, key: str | None, protocol: Protocol) -> list[FoldRun]:
    """The final runs of a loss: its tuned setting (``key``; none before any trial finished) and its default, each
    K folds x S seeds."""
    runs = []
    for kind, setting in ((TUNED, key), (DEFAULT, "")):
        if kind == TUNED and key is None:
            continue
        runs += [
            FoldRun(dataset, loss, kind, fold, seed, setting)
            for seed in protocol.seeds
            for fold in range(protocol.folds)
        ]
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Results: tables, CSVs and plots


@dataclass
class FinalResult:
    """The test metrics of one finished final run."""

    dataset: str
    loss: str
    kind: str
    key: str
    seed: int
    fold: int
    folder: Path
    metrics: dict[str, float]


def collect_final_results(results_dir: Path) -> list[FinalResult]:
    """Every finished final run under ``results_dir`` (``<dataset>/<loss>/final/<setting>/seed<s>/fold<k>``)."""
    found = []
    for folder in sorted(Path(results_dir).glob("*/*/final/*/seed*/fold*")):
        if not final_finished(folder):
            continue
        setting, seed, fold = folder.parent.parent.name, folder.parent.name, folder.name
        kind, _, key = setting.partition("-")
        summary = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        metrics = {k: float(v) for k, v in summary["metrics"]["test"].items()}
        dataset, loss = folder.parents[4].name, folder.parents[3].name
        found.append(FinalResult(dataset, loss, kind, key, int(seed[4:]), int(fold[4:]), folder, metrics))
    return found


@dataclass
class Interval:
    """Mean and 95% confidence interval of ``n`` values (low and high NaN when ``n`` < 2)."""

    mean: float
    low: float
    high: float
    n: int

    def cell(self) -> str:
        """``mean ± half-width`` in percent (the mean alone without an interval)."""
        if self.n == 0 or math.isnan(self.mean):
            return ""
        if self.n < 2 or math.isnan(self.low):
            return f"{100 * self.mean:.1f}"
        return f"{100 * self.mean:.1f} ± {100 * (self.high - self.low) / 2:.1f}"


def interval(values: Sequence[float]) -> Interval:
    """The mean and 95% t-interval of ``values`` (:func:`metricsearch.analysis.compare.mean_ci`)."""
    from metricsearch.analysis.compare import mean_ci

    values = [float(v) for v in values]
    if not values:
        return Interval(math.nan, math.nan, math.nan, 0)
    if len(values) == 1:
        return Interval(values[0], math.nan, math.nan, 1)
    mean, low, high = mean_ci(values)
    return Interval(float(mean), float(low), float(high), len(values))


@dataclass
class LossSummary:
    """One loss of one dataset: its search, its best setting and the intervals of its final runs per metric."""

    dataset: str
    loss: str
    budget: int
    trial_counts: dict[str, int]
    best_value: float | None
    best_params: dict[str, Any]
    best_key: str | None
    tuned: dict[str, Interval] = field(default_factory=dict)
    concatenated: dict[str, Interval] = field(default_factory=dict)
    default: dict[str, Interval] = field(default_factory=dict)
    tuned_values: dict[str, list[float]] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)


def format_params(params: Mapping[str, Any]) -> str:
    """``loss.margin=0.1`` -> ``margin 0.1``: the searched parameters, short, in a table cell.

    Example:
        >>> format_params({"loss.margin": 0.123456, "miner.epsilon": 0.5})
        'margin 0.123, miner.epsilon 0.5'
    """
    parts = []
    for key, value in params.items():
        name = key.removeprefix("loss.")
        parts.append(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts)


def indistinguishable_marks(summaries: Sequence[LossSummary], metric: str) -> dict[str, str]:
    """``best`` for the loss of highest tuned mean, ``≈`` for those Welch's test cannot tell from it (p ≥ 0.05)."""
    from metricsearch.analysis.compare import indistinguishable_from_best

    samples = {s.loss: s.tuned_values.get(metric, []) for s in summaries if s.tuned_values.get(metric)}
    if not samples:
        return {}
    best = max(samples, key=lambda loss: (float(np.mean(samples[loss])), loss))
    same = indistinguishable_from_best(samples) if len(samples) > 1 else {best: True}
    return {loss: "best" if loss == best else ("≈" if same.get(loss) else "") for loss in samples}


def format_compare_markdown(summaries: Sequence[LossSummary], protocol_line: str = "", footer: str = "") -> str:
    """Per dataset: the search (trials, best validation score, best parameters) and one table per metric."""
    lines = ["## Fair comparison: equal tuning budget per loss, class-disjoint cross-validation, 95% CIs", ""]
    if protocol_line:
        lines += [protocol_line, ""]
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        rows = [s for s in summaries if s.dataset == dataset]
        lines += [
            f"### {dataset}",
            "",
            "| loss | trials | best val MAP@R | best parameters | final runs |",
            "|---|---:|---:|---|---|",
        ]
        for s in rows:
            counts = ", ".join(f"{n} {state.lower()}" for state, n in s.trial_counts.items() if n)
            best = "" if s.best_value is None else f"{100 * s.best_value:.1f}"
            lines.append(
                f"| {s.loss} | {s.budget} ({counts}) | {best} | {format_params(s.best_params)} | "
                f"{s.folders.get(TUNED, '')} |"
            )
        lines.append("")
        for metric in TABLE_METRICS:
            if not any(metric in s.tuned or metric in s.default for s in rows):
                continue
            marks = indistinguishable_marks(rows, metric)
            ordered = sorted(rows, key=lambda s: -(s.tuned[metric].mean if metric in s.tuned else -1.0))
            lines += [
                f"#### {metric_title(metric)} (test, %)",
                "",
                "| loss | tuned, separate | tuned, concatenated | default params, separate | vs best |",
                "|---|---:|---:|---:|:---:|",
            ]
            for s in ordered:
                cells = [
                    s.tuned.get(metric, Interval(math.nan, math.nan, math.nan, 0)).cell(),
                    s.concatenated.get(metric, Interval(math.nan, math.nan, math.nan, 0)).cell(),
                    s.default.get(metric, Interval(math.nan, math.nan, math.nan, 0)).cell(),
                    marks.get(s.loss, ""),
                ]
                lines.append(f"| {s.loss} | " + " | ".join(cells) + " |")
            lines.append("")
    if footer:
        lines += [footer.rstrip(), ""]
    return "\n".join(lines)


def _recall_at_k(folder: Path) -> list[int]:
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        return [int(k) for k in config["data"]["recall_at_k"]]
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return [1, 2, 4, 8]


def summarize_loss(
    dataset: str,
    loss: str,
    trials: Sequence[optuna.trial.FrozenTrial],
    budget: int,
    finals: Sequence[FinalResult],
    results_dir: Path,
) -> LossSummary:
    """Intervals of one loss's final runs: separate (every fold model of every seed), concatenated (per seed, the
    fold models' test embeddings side by side) and default-parameter separate."""
    from metricsearch.analysis.compare import concatenated_metrics

    counts = {state: 0 for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    best = best_trial(trials, budget)
    key = best.user_attrs.get("key") if best is not None else None
    summary = LossSummary(
        dataset,
        loss,
        budget,
        counts,
        best.value if best is not None else None,
        dict(best.params) if best is not None else {},
        key,
    )
    tuned = [r for r in finals if r.kind == TUNED and r.key == key]
    default = [r for r in finals if r.kind == DEFAULT]
    base = Path(dataset) / loss / "final"
    if key:
        summary.folders[TUNED] = str(base / f"{TUNED}-{key}")
    summary.folders[DEFAULT] = str(base / DEFAULT)
    names = recall_keys([m for r in tuned + default for m in r.metrics]) + ["map@r", "r_precision"]
    for name in names:
        values = [r.metrics[name] for r in tuned if name in r.metrics]
        if values:
            summary.tuned_values[name] = values
            summary.tuned[name] = interval(values)
        default_values = [r.metrics[name] for r in default if name in r.metrics]
        if default_values:
            summary.default[name] = interval(default_values)
    per_seed: dict[int, list[FinalResult]] = {}
    for r in tuned:
        per_seed.setdefault(r.seed, []).append(r)
    concatenated: list[dict[str, float]] = []
    for _seed, runs in sorted(per_seed.items()):
        runs = sorted(runs, key=lambda r: r.fold)
        if [r.fold for r in runs] != list(range(len(runs))) or len(runs) < 2:
            continue
        paths = [r.folder / TEST_EMBEDDINGS for r in runs]
        concatenated.append(concatenated_metrics(paths, _recall_at_k(runs[0].folder)))
    for name in names:
        values = [m[name] for m in concatenated if name in m]
        if values:
            summary.concatenated[name] = interval(values)
    return summary


def trial_rows(
    dataset: str, loss: str, trials: Sequence[optuna.trial.FrozenTrial], budget: int, folds: int
) -> list[dict]:
    """One CSV row per trial: its parameters, fold values, objective, state and whether it counts in the budget."""
    counted = {t.number for t in budget_trials(trials, budget)}
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        # A trial killed between drawing its parameters and recording their key still names its folder: the key is
        # a function of the parameters.
        key = t.user_attrs.get("key") or (params_key(t.params) if t.params else "")
        row: dict[str, Any] = {
            "dataset": dataset,
            "loss": loss,
            "trial": t.number,
            "state": t.state.name,
            "in_budget": t.number in counted,
            "objective": "" if t.value is None else round(t.value, 6),
            "retry_of": t.system_attrs.get("failed_trial", ""),
            "params": json.dumps(t.params, sort_keys=True),
            "key": key,
            "folder": str(Path(dataset) / loss / SEARCH / key) if key else "",
        }
        for fold in range(folds):
            value = t.user_attrs.get(f"fold{fold}")
            row[f"fold{fold}"] = "" if value is None else round(value, 6)
        row.update({f"param:{k}": v for k, v in t.params.items()})
        rows.append(row)
    return rows


def plot_intervals(summaries: Sequence[LossSummary], title: str = "") -> Figure:
    """Per metric, each loss's tuned and default test mean with its 95% CI (horizontal error bars)."""
    from matplotlib.figure import Figure

    metrics = [m for m in TABLE_METRICS if any(m in s.tuned or m in s.default for s in summaries)]
    fig = Figure(figsize=(4.2 * max(1, len(metrics)), 0.45 * len(summaries) + 1.8), dpi=100)
    y = np.arange(len(summaries))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for offset, (label, attr, marker) in enumerate((("tuned", "tuned", "o"), ("default params", "default", "s"))):
            means, errors = [], [[], []]
            for s in summaries:
                iv = getattr(s, attr).get(metric, Interval(math.nan, math.nan, math.nan, 0))
                means.append(100 * iv.mean)
                has_ci = iv.n > 1 and not math.isnan(iv.low)
                errors[0].append(100 * (iv.mean - iv.low) if has_ci else 0.0)
                errors[1].append(100 * (iv.high - iv.mean) if has_ci else 0.0)
            ax.errorbar(means, y + 0.15 - 0.3 * offset, xerr=errors, fmt=marker, capsize=3, label=label)
        ax.set_yticks(y, [s.loss for s in summaries] if i == 0 else [""] * len(summaries))
        ax.set_xlabel(f"test {metric_title(metric)} (%)")
        ax.grid(axis="x", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title or "mean and 95% CI over the fold x seed models", fontsize=10)
    fig.tight_layout()
    return fig


def plot_search_history(trials: Sequence[optuna.trial.FrozenTrial], budget: int, title: str = "") -> Figure:
    """Each trial's objective (pruned trials: their first fold) and the running best, against the trial number."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    counted = budget_trials(trials, budget)
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.add_subplot()
    complete = [t for t in counted if t.state.name == "COMPLETE"]
    pruned = [t for t in counted if t.state.name == "PRUNED"]
    ax.plot([t.number for t in complete], [100 * t.value for t in complete], "o", label="trial (mean over folds)")
    if pruned:
        ax.plot(
            [t.number for t in pruned],
            [100 * t.user_attrs.get("fold0", math.nan) for t in pruned],
            "x",
            label="pruned (first fold)",
        )
    best, xs, ys = -math.inf, [], []
    for t in complete:
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(100 * best)
    ax.step(xs, ys, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation MAP@R (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _study_folds(study: optuna.Study, default: int) -> int:
    """The number of folds a study's trials were trained on (from its fingerprint)."""
    for override in study.user_attrs.get("fingerprint", {}).get("overrides", []):
        if override.startswith("data.num_folds="):
            return int(override.split("=", 1)[1])
    return default


def write_compare_results(
    results_dir: Path, storage: optuna.storages.BaseStorage | None, protocol: Protocol, command: str = ""
) -> list[LossSummary]:
    """Summarizes every study of ``storage`` and the final runs under ``results_dir`` into the tables, CSVs and
    plots."""
    import optuna

    finals = collect_final_results(results_dir)
    summaries: list[LossSummary] = []
    all_trials: list[dict] = []
    studies = optuna.get_all_study_summaries(storage) if storage is not None else []
    histories: dict[tuple[str, str], tuple[list, int]] = {}
    for entry in sorted(studies, key=lambda s: s.study_name):
        dataset, _, loss = entry.study_name.partition("/")
        study = optuna.load_study(study_name=entry.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        budget = int(study.user_attrs.get("budget", protocol.trials))
        folds = _study_folds(study, protocol.folds)
        all_trials += trial_rows(dataset, loss, trials, budget, folds)
        summaries.append(
            summarize_loss(
                dataset,
                loss,
                trials,
                budget,
                [r for r in finals if (r.dataset, r.loss) == (dataset, loss)],
                results_dir,
            )
        )
        histories[(dataset, loss)] = (trials, budget)
    trial_columns = list(dict.fromkeys(k for row in all_trials for k in row))
    write_csv(results_dir / "trials.csv", all_trials, trial_columns)
    best_keys = {(s.dataset, s.loss): s.best_key for s in summaries}
    run_rows = []
    for r in finals:
        run_rows.append(
            {
                "dataset": r.dataset,
                "loss": r.loss,
                "kind": r.kind,
                "key": r.key,
                "current": r.kind == DEFAULT or best_keys.get((r.dataset, r.loss)) == r.key,
                "seed": r.seed,
                "fold": r.fold,
                **{k: round(v, 6) for k, v in r.metrics.items()},
                "folder": str(r.folder.relative_to(results_dir)),
                "config": str((r.folder / "config.yaml").relative_to(results_dir)),
            }
        )
    write_csv(results_dir / "runs.csv", run_rows, list(dict.fromkeys(k for row in run_rows for k in row)))
    summary_rows = []
    for s in summaries:
        for kind, table in ((TUNED, s.tuned), ("concatenated", s.concatenated), (DEFAULT, s.default)):
            for metric, iv in table.items():
                summary_rows.append(
                    {
                        "dataset": s.dataset,
                        "loss": s.loss,
                        "kind": kind,
                        "metric": metric,
                        "mean": round(iv.mean, 6),
                        "ci_low": "" if math.isnan(iv.low) else round(iv.low, 6),
                        "ci_high": "" if math.isnan(iv.high) else round(iv.high, 6),
                        "n": iv.n,
                        "folder": s.folders.get(DEFAULT if kind == DEFAULT else TUNED, ""),
                    }
                )
    write_csv(results_dir / "summary.csv", summary_rows, list(dict.fromkeys(k for row in summary_rows for k in row)))
    protocol_line = (
        f"Per loss: {protocol.trials} Optuna TPE trials of its own parameters (conf/compare/<loss>.yaml"
        f"{'; the first at its default setting' if protocol.include_default else ''}), each "
        f"trained on {protocol.folds} class-disjoint folds of the training classes and scored by the mean "
        f"validation {protocol.monitor.split('/', 1)[1].upper()} over folds; the test classes are never evaluated "
        f"during the search. The best setting and the default one are then trained {protocol.folds} folds x "
        f"{len(protocol.seeds)} seed(s) and tested once. Separate: mean ± half-width of the 95% t-interval over "
        "the fold x seed models; concatenated: the fold models' embeddings side by side, interval over seeds; "
        "vs best: `≈` when Welch's t-test over the separate values cannot tell the loss from the best (p ≥ 0.05)."
    )
    footer = f"Command: `{command}`" if command else ""
    atomic_write_text(results_dir / "compare.md", format_compare_markdown(summaries, protocol_line, footer))
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        rows = [s for s in summaries if s.dataset == dataset and (s.tuned or s.default)]
        if rows:
            save_figure(
                plot_intervals(rows, f"{dataset}: test mean and 95% CI"), results_dir / dataset / "intervals.png"
            )
    for (dataset, loss), (trials, budget) in histories.items():
        if any(t.state.name == "COMPLETE" for t in trials):
            figure = plot_search_history(trials, budget, f"{dataset} / {loss}: search")
            save_figure(figure, results_dir / dataset / loss / "search_history.png")
    return summaries


# ----------------------------------------------------------------------------------------------------------------
# The whole comparison


def compare(
    datasets: Sequence[str] | None = None,
    losses: Sequence[str] | None = None,
    results_dir: str | Path | None = None,
    *,
    extra: Sequence[str] = (),
    timeout: float | None = None,
    dry_run: bool = False,
    aggregate_only: bool = False,
    command: str = "",
    **settings: Any,
) -> int:
    """Runs the protocol for every dataset x loss, then rewrites the results; returns the exit status.

    Args:
        datasets: conf/data names (none: the protocol's); real datasets run only when their data is on disk.
        losses: losses with a ``conf/compare/<loss>.yaml`` (none: the protocol's).
        results_dir: where the runs, the studies and the tables go (default: the repository's ``results/compare``).
        extra: Hydra overrides added to every run (``logger=wandb`` groups the runs by loss in W&B).
        timeout: seconds after which a fold run counts as failed.
        dry_run: print the studies and a final run's command, run nothing.
        aggregate_only: only rewrite the tables from the studies and finished runs.
        command: the command line, recorded in ``compare.md``.
        settings: the protocol's settings (trials, folds, seeds, epochs, image_size, workers, prune, storage, ...);
            None keeps ``conf/compare/protocol.yaml``'s.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = Console()
    protocol = load_protocol(**settings)
    if datasets:
        protocol = replace(protocol, datasets=tuple(datasets))
    if losses:
        protocol = replace(protocol, losses=tuple(losses))
    results_dir = Path(results_dir or REPO_ROOT / "results" / "compare").resolve()
    spaces = [load_search_space(loss) for loss in dict.fromkeys(protocol.losses)]
    url = protocol.storage or default_storage(results_dir)
    if dry_run:
        storage = None
    elif url == default_storage(results_dir) and not results_dir.joinpath("optuna.db").is_file() and aggregate_only:
        storage = None  # nothing has run here yet
    else:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        storage = open_storage(url, protocol)
    ctx = Context(protocol, results_dir, tuple(extra), timeout, console)
    failed: list[str] = []
    if not aggregate_only:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        start = time.perf_counter()
        for dataset in dict.fromkeys(protocol.datasets):
            ok, reason = dataset_availability(dataset, extra)
            if not ok:
                console.print(f"[yellow]skipping dataset {dataset}: {reason}[/yellow]")
                continue
            for space in spaces:
                try:
                    _compare_one(dataset, space, storage, ctx, dry_run)
                except CompareError as err:
                    failed.append(f"{dataset}/{space.loss}")
                    console.print(f"[red]{err}[/red]")
        console.print(f"compare pass took {(time.perf_counter() - start) / 60:.1f} min")
    if dry_run:
        return 0
    summaries = write_compare_results(results_dir, storage, protocol, command)
    console.print(f"wrote {results_dir / 'compare.md'} ({len(summaries)} dataset x loss studies)")
    if failed:
        console.print(f"[red]{len(failed)} studies did not finish ({', '.join(failed)}); rerun the same command[/red]")
        return 1
    return 0


def _compare_one(dataset: str, space: SearchSpace, storage, ctx: Context, dry_run: bool) -> None:
    """The search, then the final runs, of one dataset x loss."""
    protocol = ctx.protocol
    name = study_name(dataset, space.loss)
    if dry_run:
        example = FoldRun(dataset, space.loss, SEARCH, 0, protocol.search_seed, "KEY")
        command = shlex.join(run_overrides(example, protocol, space.overrides, {}, ctx.results_dir, ctx.extra))
        ctx.say(f"would search {name}: {protocol.trials} trials x {protocol.folds} folds, each fold run:")
        ctx.say(f"  python train.py {command} <params>")
        return
    study = open_study(storage, dataset, space, protocol, ctx.extra)
    defaults = queue_default_trial(study, dataset, space, protocol, ctx.extra)
    if defaults is not None:
        ctx.say(f"queue  {name}: the default setting first ({format_params(defaults)})")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    states = FINISHED_STATES
    with Progress(*columns, console=ctx.console, transient=False) as progress:
        ctx.console = progress.console
        done = sum(t.state.name in states for t in study.get_trials(deepcopy=False))
        task = progress.add_task(f"search {name}", total=protocol.trials, completed=min(done, protocol.trials))

        def on_trial(s) -> None:
            finished = sum(t.state.name in states for t in s.get_trials(deepcopy=False))
            progress.update(task, completed=min(finished, protocol.trials))

        run_search(study, dataset, space, ctx, on_trial)
        trials = study.get_trials(deepcopy=False)
        best = best_trial(trials, protocol.trials)
        if best is None:
            raise CompareError(f"study {name} has no complete trial; see the reproduce.log of its fold runs")
        ctx.say(
            f"best   {name}: trial {best.number}, {protocol.monitor} {best.value:.4f} ({format_params(best.params)})"
        )
        runs = final_runs(dataset, space.loss, best.user_attrs["key"], protocol)
        final_task = progress.add_task(f"final {name}", total=len(runs))
        errors = []
        for run in runs:
            params = dict(best.params) if run.kind == TUNED else {}
            try:
                ensure_run(run, space, params, ctx)
            except FoldRunFailed as err:
                errors.append(str(err))
                ctx.say(f"[red]{err}[/red]")
            progress.advance(final_task)
    if errors:
        raise CompareError(f"{len(errors)} final runs of {name} failed; the first: {errors[0]}")
