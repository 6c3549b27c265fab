"""The whole comparison: for every dataset x loss the search, then the final runs, then the results."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metricsearch.analysis.run_folder import REPRODUCE_LOG
from metricsearch.pipelines.compare.finals import final_runs
from metricsearch.pipelines.compare.folds import (
    SEARCH,
    TUNED,
    Context,
    FoldRun,
    FoldRunFailed,
    ensure_run,
    run_overrides,
)
from metricsearch.pipelines.compare.reports import format_params, write_compare_results
from metricsearch.pipelines.compare.space import CompareError, SearchSpace, load_protocol, load_search_space
from metricsearch.pipelines.compare.study import (
    FINISHED_STATES,
    best_trial,
    default_storage,
    open_storage,
    open_study,
    queue_default_trial,
    run_search,
    study_name,
)
from metricsearch.pipelines.reproduce import dataset_availability
from metricsearch.utils.config import REPO_ROOT


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
            raise CompareError(f"study {name} has no complete trial; see the {REPRODUCE_LOG} of its fold runs")
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
