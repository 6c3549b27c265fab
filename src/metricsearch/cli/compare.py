"""Command line of ``scripts/compare.py`` / ``make compare``: the fair loss comparison.

The work is in :mod:`metricsearch.pipelines.compare`; the protocol's defaults are ``conf/compare/protocol.yaml``
(an option left out keeps the file's value). ``make compare`` spells the options ``--datasets A,B --trials N ...``,
which mean the same as ``datasets=A,B trials=N``.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence

from metricsearch.cli.args import Arguments, Command, Option, run_command
from metricsearch.cli.reproduce import _seeds, _split
from metricsearch.utils.config import ConfigError

COMPARE = Command(
    name="compare",
    summary=(
        "Fair loss comparison (A Metric Learning Reality Check): per dataset and loss an Optuna study of the loss's "
        "own parameters, each trial trained on K class-disjoint folds of the training classes and scored on "
        "validation MAP@R; then the best and the default parameters trained folds x seeds and tested once. "
        "Resumable (studies in results/compare/optuna.db). Writes results/compare/compare.md, trials.csv, runs.csv, "
        "summary.csv and plots. Options left out (none) keep conf/compare/protocol.yaml's values."
    ),
    options={
        "datasets": Option(None, "comma-separated conf/data names; real ones only when on disk"),
        "losses": Option(None, "comma-separated losses with a conf/compare/<loss>.yaml"),
        "trials": Option(None, "Optuna trials per loss and dataset", type=int),
        "folds": Option(None, "class-disjoint folds of the training classes", type=int),
        "seeds": Option(None, "comma-separated seeds of the final runs"),
        "epochs": Option(None, "trainer.max_epochs of every run", type=int),
        "image_size": Option(
            None,
            "training crop and evaluation size; on built-in data also the generated size",
            type=int,
        ),
        "workers": Option(None, "trials run at once on this machine", type=int),
        "prune": Option(None, "stop hopeless trials after their first fold", type=bool),
        "include_default": Option(
            None, "make each study's first trial the loss's default setting (it then counts toward trials)", type=bool
        ),
        "storage": Option(None, "Optuna storage URL (none: sqlite:///<results_dir>/optuna.db)"),
        "results_dir": Option(None, "where the runs, studies and tables go (none: the repository's results/compare/)"),
        "extra": Option("", "Hydra overrides added to every run, e.g. 'logger=wandb backbone=resnet18'"),
        "timeout": Option(None, "seconds after which a fold run counts as failed", type=float),
        "dry_run": Option(False, "list the studies and a fold run's command, run nothing"),
        "aggregate_only": Option(False, "only rewrite the tables from the studies and finished runs"),
    },
    # The comparison shows its own progress; the runs' logs go to their reproduce.log.
    log_level=logging.WARNING,
)


def _compare(args: Arguments, command: str) -> int:
    from metricsearch.pipelines.compare import compare

    seeds = _seeds(args["seeds"]) if args["seeds"] else None
    return compare(
        datasets=_split(args["datasets"]) or None,
        losses=_split(args["losses"]) or None,
        results_dir=args["results_dir"],
        extra=shlex.split(args["extra"] or ""),
        timeout=args["timeout"],
        dry_run=args["dry_run"],
        aggregate_only=args["aggregate_only"],
        command=command,
        trials=args["trials"],
        folds=args["folds"],
        seeds=seeds,
        epochs=args["epochs"],
        image_size=args["image_size"],
        workers=args["workers"],
        prune=args["prune"],
        include_default=args["include_default"],
        storage=args["storage"],
    )


def main_compare(argv: Sequence[str]) -> int:
    """``scripts/compare.py``; the command line is recorded in ``compare.md``."""
    command = shlex.join(["python", "scripts/compare.py", *argv])
    return run_command(COMPARE, argv, lambda args: _compare(args, command), errors={ConfigError: 2})
