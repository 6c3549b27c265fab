"""The supervision comparison: class labels, pairs, triplets, self-supervised, and the references.

`nice -n 10 python scripts/supervision_study.py` trains every setting for every seed on the built-in data, one run
at a time (a run that finished is skipped, so the same command continues an interrupted study), then writes the
tables and the plot; `dataset=cifar_standin` runs it on the seed example's CIFAR-10 stand-in instead, and
`train=false` only summarizes what has finished.
"""

import sys

from metricsearch.cli.args import Arguments, Command, Option, UsageError, run_command

STUDY = Command(
    name="supervision_study",
    summary=(
        "Train class / pairs / triplets / self-supervised settings for the same steps and images, over seeds, one "
        "run at a time; then write runs.csv, summary.csv, summary.md and supervision.png (test R@1 and MAP@R, mean "
        "and 95% interval over seeds) into results=."
    ),
    options={
        "dataset": Option(
            "builtin",
            "builtin (resnet10t on the built-in data at 32 px, unseen test classes) or cifar_standin (the seed "
            "example, experiment=seed_cifar10, on data=synthetic_cifar, closed set)",
        ),
        "out": Option(
            None,
            "where the runs and the tuples files go (none: outputs/supervision_study, or "
            "outputs/supervision_study_cifar_standin for dataset=cifar_standin)",
            type=str,
        ),
        "results": Option(
            None,
            "where the tables and the plot go (none: results/supervision, or results/supervision/cifar_standin)",
            type=str,
        ),
        "data_dir": Option("data", "the built-in data's folder (paths.data_dir)"),
        "seeds": Option("0,1", "comma-separated seeds"),
        "steps": Option(
            None,
            "optimizer steps of every trained run (none: builtin 300 steps of 64 images, cifar_standin 2000 of 20)",
            type=int,
        ),
        "budgets": Option("400,3200", "comma-separated numbers of pairs and of triplets"),
        "settings": Option(None, "comma-separated settings to train, e.g. class,pairs_400 (none: all)", type=str),
        "train": Option(True, "train what has not finished (false: only summarize)"),
        "frozen_reference": Option(True, "also evaluate the ImageNet EfficientNet-Lite0 as it is"),
    },
)


def _study(args: Arguments) -> None:
    from metricsearch.pipelines.supervision_study import (
        VARIANTS,
        format_summary_markdown,
        run_study,
        study_settings,
        summarize_study,
    )

    variant = VARIANTS.get(args["dataset"])
    if variant is None:
        raise UsageError(f"dataset={args['dataset']} is not one of {', '.join(VARIANTS)}")
    budgets = [int(b) for b in str(args["budgets"]).split(",")]
    steps = variant.steps if args["steps"] is None else args["steps"]
    if steps < 1:
        raise UsageError(f"steps={steps} must be at least 1")
    settings = None
    if args["settings"]:
        settings = [name.strip() for name in args["settings"].split(",")]
        known = [setting.name for setting in study_settings(budgets, variant)]
        unknown = [name for name in settings if name not in known]
        if unknown:
            raise UsageError(f"settings={','.join(unknown)}: not a setting of the study; choose from {','.join(known)}")
    out, results = args["out"] or variant.out, args["results"] or variant.results
    if args["train"]:
        seeds = [int(s) for s in str(args["seeds"]).split(",")]
        run_study(out, args["data_dir"], seeds, steps, budgets, args["frozen_reference"], variant, settings)
    print(format_summary_markdown(summarize_study(out, results, budgets, variant)), end="")


if __name__ == "__main__":
    sys.exit(run_command(STUDY, sys.argv[1:], _study, {FileNotFoundError: 1}))
