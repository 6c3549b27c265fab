"""The supervision comparison on the built-in data: class labels, pairs, triplets, self-supervised, references.

`nice -n 10 python scripts/supervision_study.py` trains every setting for every seed, one run at a time (a run that
finished is skipped, so the same command continues an interrupted study), then writes the tables and the plot;
`python scripts/supervision_study.py train=false` only summarizes what has finished.
"""

import sys

from metricsearch.cli.args import Arguments, Command, Option, run_command

STUDY = Command(
    name="supervision_study",
    summary=(
        "Train class / pairs / triplets / self-supervised settings on the built-in data for the same steps and "
        "images, over seeds, one run at a time; then write runs.csv, summary.csv, summary.md and supervision.png "
        "(test R@1 and MAP@R, mean and 95% interval over seeds) into results=."
    ),
    options={
        "out": Option("outputs/supervision_study", "where the runs and the tuples files go"),
        "results": Option("results/supervision", "where the tables and the plot go"),
        "data_dir": Option("data", "the built-in data's folder (paths.data_dir)"),
        "seeds": Option("0,1", "comma-separated seeds"),
        "steps": Option(50, "optimizer steps of every run (64-image batches)"),
        "budgets": Option("400,3200", "comma-separated numbers of pairs and of triplets"),
        "train": Option(True, "train what has not finished (false: only summarize)"),
        "frozen_reference": Option(True, "also evaluate the ImageNet EfficientNet-Lite0 as it is"),
    },
)


def _study(args: Arguments) -> None:
    from metricsearch.pipelines.supervision_study import format_summary_markdown, run_study, summarize_study

    budgets = [int(b) for b in str(args["budgets"]).split(",")]
    if args["train"]:
        seeds = [int(s) for s in str(args["seeds"]).split(",")]
        run_study(args["out"], args["data_dir"], seeds, args["steps"], budgets, args["frozen_reference"])
    print(format_summary_markdown(summarize_study(args["out"], args["results"], budgets)), end="")


if __name__ == "__main__":
    sys.exit(run_command(STUDY, sys.argv[1:], _study, {FileNotFoundError: 1}))
