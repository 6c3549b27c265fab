"""Command line of ``scripts/demo.py`` / ``make demo``; the work is in :mod:`metricsearch.pipelines.demo`."""

from __future__ import annotations

from collections.abc import Sequence

from metricsearch.cli.args import Arguments, Command, Option, PassedOn, run_command
from metricsearch.cli.search import SEARCH_ERRORS

DEMO = Command(
    name="demo",
    summary=(
        "Train (or reuse) a short default run, index its unseen test classes, search with a held-out image, "
        "write the result grid, and check that the ONNX export ranks identically."
    ),
    options={
        "out": Option("outputs/demo", "the demo's run folder (delete it to retrain)"),
        "k": Option(8, "results to show"),
        # A few minutes on two CPU cores; max_time caps it on a slower or busier machine.
        "max_epochs": Option(8, "training epochs"),
        "max_time": Option("00:00:05:00", "training wall-clock cap (DD:HH:MM:SS)"),
        "index.backend": Option("faiss", "index backend: faiss or milvus (Milvus Lite, out/index/gallery.db)"),
        "index.uri": Option(
            None, "index.backend=milvus: a Milvus Lite file or a server URL (default: in the index folder)"
        ),
    },
    passed_on=PassedOn(("train.",), (("train.KEY=VALUE", "passed on to train.py as KEY=VALUE"),)),
)


def _demo(args: Arguments) -> None:
    from metricsearch.pipelines.demo import run_demo

    train_args = [override.removeprefix("train.") for override in args.overrides]
    run_demo(
        args["out"],
        args["k"],
        args["max_epochs"],
        args["max_time"],
        train_args,
        backend=args["index.backend"],
        uri=args["index.uri"],
    )


def main_demo(argv: Sequence[str] | None = None) -> int:
    """``scripts/demo.py``."""
    return run_command(DEMO, argv, _demo, SEARCH_ERRORS)
