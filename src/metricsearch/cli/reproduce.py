"""Command line of ``scripts/reproduce.py`` / ``make reproduce``: the loss x dataset x seed grid.

The work is in :mod:`metricsearch.pipelines.reproduce`. ``make reproduce`` spells the options ``--datasets A,B
--losses ... --seeds ... --epochs N --extra "..."``, which mean the same as ``datasets=A,B losses=...``.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence

from metricsearch.cli.args import Arguments, Command, Option, UsageError, run_command
from metricsearch.pipelines.reproduce import (
    DEFAULT_DATASETS,
    DEFAULT_LOSSES,
    DEFAULT_SEEDS,
    DEFAULT_SYNTHETIC_EPOCHS,
    reproduce,
)
from metricsearch.utils.recipes import BACKBONE_WEIGHTS

REPRODUCE = Command(
    name="reproduce",
    summary=(
        "Run the loss x dataset x seed grid of training runs into results/runs/ (resumable: finished cells are "
        "skipped, interrupted ones continue), then summarize the finished cells into results/results.md, "
        "results.csv, runs.csv and recall_at_1.png."
    ),
    options={
        "datasets": Option(
            ",".join(DEFAULT_DATASETS),
            "comma-separated conf/data names; real datasets run only when their data is on disk",
        ),
        "losses": Option(
            None,
            f"comma-separated conf/loss names (none: {','.join(DEFAULT_LOSSES)} on built-in data; every paper "
            "recipe of conf/experiment on CUB, Cars196 and SOP, or only the recipes of the losses given)",
        ),
        "seeds": Option(",".join(map(str, DEFAULT_SEEDS)), "comma-separated seeds"),
        "epochs": Option(
            None,
            f"trainer.max_epochs of every cell (none: {DEFAULT_SYNTHETIC_EPOCHS} on synthetic, conf/trainer's "
            "elsewhere)",
            type=int,
        ),
        "results_dir": Option(None, "where runs/ and the tables go (none: the repository's results/)"),
        "extra": Option("", "Hydra overrides added to every cell, e.g. 'backbone=resnet18'"),
        "weights": Option(
            "",
            "offline pretrained weights per recipe backbone, comma-separated BACKBONE=FILE (backbones: "
            f"{', '.join(BACKBONE_WEIGHTS)}): each file becomes backbone.weights_file of the recipes on that backbone",
        ),
        "timeout": Option(None, "seconds after which a cell counts as failed", type=float),
        "dry_run": Option(False, "list the cells and their commands, run nothing"),
        "aggregate_only": Option(False, "only rewrite the tables from finished cells"),
    },
    # The grid shows its own progress; the cells' logs go to their reproduce.log.
    log_level=logging.WARNING,
)


def _reproduce(args: Arguments, command: str) -> int:
    return reproduce(
        datasets=_split(args["datasets"]),
        losses=_split(args["losses"]) or None,
        seeds=_seeds(args["seeds"]),
        results_dir=args["results_dir"],
        epochs=args["epochs"],
        extra=shlex.split(args["extra"] or ""),
        weights=_weights(args["weights"]),
        timeout=args["timeout"],
        dry_run=args["dry_run"],
        aggregate_only=args["aggregate_only"],
        command=command,
    )


def main_reproduce(argv: Sequence[str]) -> int:
    """``scripts/reproduce.py``; the command line is recorded in ``results.md``."""
    command = shlex.join(["python", "scripts/reproduce.py", *argv])
    return run_command(REPRODUCE, argv, lambda args: _reproduce(args, command))


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").replace(" ", ",").split(",") if item.strip()]


def _weights(text: str | None) -> dict[str, str]:
    """``bn_inception=PATH,resnet50_tv=PATH`` as a mapping, each backbone one of BACKBONE_WEIGHTS."""
    weights = {}
    for item in _split(text):
        backbone, sep, path = item.partition("=")
        if not sep or not path or backbone not in BACKBONE_WEIGHTS:
            raise UsageError(
                f"weights={text}: each item is BACKBONE=FILE with BACKBONE one of {', '.join(BACKBONE_WEIGHTS)}, "
                "e.g. weights=bn_inception=/models/bn_inception-52deb4733.pth"
            )
        weights[backbone] = path
    return weights


def _seeds(text: str | None) -> list[int]:
    try:
        return [int(seed) for seed in _split(text)]
    except ValueError:
        raise UsageError(f"seeds={text} must be comma-separated whole numbers, e.g. seeds=0,1,2") from None
