"""The search: one Optuna study per dataset and loss, its storage, its trials and their budget."""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metricsearch.analysis.run_folder import REPRODUCE_LOG
from metricsearch.pipelines.compare.folds import (
    SEARCH,
    Context,
    FoldRun,
    FoldRunFailed,
    ensure_run,
    run_overrides,
    validation_score,
)
from metricsearch.pipelines.compare.space import CompareError, Protocol, SearchSpace, params_key, sample_params
from metricsearch.utils.config import CONFIG_DIR, normalize_overrides

if TYPE_CHECKING:
    import optuna

# Trials that used their budget: finished (COMPLETE) or stopped as hopeless after their first fold (PRUNED).
FINISHED_STATES = ("COMPLETE", "PRUNED")


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
            f"{REPRODUCE_LOG} of their fold runs"
        )
