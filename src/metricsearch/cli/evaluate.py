"""Command line of ``scripts/evaluate.py``: a model's retrieval metrics on a labelled folder of one's own.

The work is in :mod:`metricsearch.pipelines.evaluate`; the data is named with the training config's overrides
(``data=folder data.root=DIR``), as ``train.py`` and ``scripts/check_data.py`` name it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from metricsearch.cli.args import Arguments, Command, Option, PassedOn, UsageError, run_command
from metricsearch.cli.search import model_choice, model_options
from metricsearch.data.io import ImageLoadError
from metricsearch.data.records import DatasetError
from metricsearch.inference.errors import InferenceError
from metricsearch.utils.config import ConfigError

# Everything the user can fix is one line: a model that cannot be loaded, a setting, the data.
EVALUATE_ERRORS = {InferenceError: 2, ConfigError: 2, DatasetError: 1, ImageLoadError: 1, FileNotFoundError: 2}

EVALUATE = Command(
    name="evaluate",
    summary=(
        "Measure a model (a training checkpoint, or a pretrained backbone as is) on a labelled image folder with the "
        "training pipeline's test loop: print its metrics table and write metrics.json, the retrieval grid and, for "
        "up to max_confusion_classes classes, the neighbour confusion matrix into out=. Folder layouts: "
        "root/<class>/ (every class searched against itself), root/train/ + root/test/ (test/ searched against "
        "itself), root/query/ + root/gallery/ (each query searched in the gallery)."
    ),
    options={
        "ckpt": Option(None, "a training checkpoint (.ckpt)"),
        **model_options("backbone"),
        "out": Option(None, "the output folder; none: outputs/evaluate/<date>_<time>"),
        "batch_size": Option(None, "images per batch and process; none: the data config's eval_batch_size", int),
        "num_workers": Option(None, "image-decoding processes; none: the data config's, at most one per core", int),
        "max_confusion_classes": Option(50, "draw the neighbour confusion matrix up to this many classes (0: never)"),
    },
    passed_on=PassedOn(
        ("data", "trainer", "module.", "seed", "postprocess"),
        (
            ("postprocess=NAME", "re-ranking before the metrics: none, aqe, dba, k_reciprocal (conf/postprocess)"),
            ("module.KEY=VALUE", "evaluation settings, e.g. module.postprocess.k=3, module.verification_fmrs=[0.01]"),
            ("data=NAME", "the dataset: a conf/data option (default: folder)"),
            ("data.root=PATH", "its folder (short for data.source.root)"),
            ("data.KEY=VALUE", "any data setting, e.g. data.source.protocol=closed_set, data.recall_at_k=[1,5]"),
            ("trainer=NAME", "a conf/trainer option: default (a GPU when there is one), cpu, gpu, ddp"),
            ("trainer.KEY=VALUE", "passed on to the trainer config"),
        ),
    ),
)


def _evaluate(args: Arguments) -> None:
    from metricsearch.pipelines.evaluate import evaluate_model, format_evaluation
    from metricsearch.utils.console_logging import quiet_lightning_console

    # Lightning's own start-up lines (GPU available, tips) would bury the table: they stay off the console (its
    # warnings still show), without silencing the logger for the rest of the process.
    quiet_lightning_console()
    choice = {key: value for key, value in model_choice(args).items() if value}
    if len(choice) != 1:
        raise UsageError(f"evaluate needs exactly one of ckpt= or backbone=; got {', '.join(choice) or 'none'}")
    if args["max_confusion_classes"] < 0:
        raise UsageError(f"max_confusion_classes={args['max_confusion_classes']} must be 0 (never) or more")
    evaluation = evaluate_model(
        choice,
        args.overrides,
        args["out"],
        batch_size=args["batch_size"],
        num_workers=args["num_workers"],
        max_confusion_classes=args["max_confusion_classes"],
        progress_bar=sys.stderr.isatty(),
    )
    print(format_evaluation(evaluation))


def main_evaluate(argv: Sequence[str] | None = None) -> int:
    """``scripts/evaluate.py``."""
    return run_command(EVALUATE, argv, _evaluate, EVALUATE_ERRORS)
