"""The measured comparison of supervision settings on the built-in data (``scripts/supervision_study.py``).

Every setting trains the same backbone (the default run's resnet10t, from scratch, on the built-in data drawn at
32 px) on the images of the
same training classes for the same number of optimizer steps of 64-image batches, then is tested on the 100 unseen
test classes: ``class`` (every training image labelled), ``pairs`` and ``triplets`` at two tuple budgets (files drawn
by ``scripts/make_tuples.py``), and ``none`` with each self-supervised method. The untrained network (each class
run's own untrained evaluation) and an ImageNet-pretrained EfficientNet-Lite0 used as it is (no training, its own
224 px preprocessing) are the references. Runs go one at a time, each a ``python train.py`` subprocess with its own
run folder, so an interrupted study continues where it stopped; :func:`summarize_study` turns whatever finished
into the per-run CSV, the mean and 95% Student-t interval over seeds per setting, a Markdown table and a plot.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metricsearch.analysis.compare import mean_ci
from metricsearch.analysis.run_folder import has_metrics, read_metrics
from metricsearch.utils.atomic_io import atomic_write_bytes, atomic_write_text
from metricsearch.utils.config import REPO_ROOT

log = logging.getLogger(__name__)

METRICS = ("recall@1", "map@r")
# Steps per epoch of the class run (1,600 training images / 64): every setting's epochs are cut to at most this.
STEPS_PER_EPOCH = 25
UNTRAINED, FROZEN = "untrained", "imagenet_frozen"
# The built-in data drawn at 32 px (its 200 classes x 20 images, the default split): a quarter of the default 64 px
# cost, so that every setting and seed fits a shared two-core machine.
DATA_OVERRIDES = ("data.source.image_size=32", "data.image_size=32", "data.resize_size=32")


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: its name, what it costs in labels, and the train.py overrides that make it."""

    name: str
    labels: str
    overrides: tuple[str, ...] = ()
    tuples: tuple[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def study_settings(budgets: Sequence[int] = (400, 3200)) -> list[Setting]:
    """The trained settings, in the order they run and are shown."""
    settings = [Setting("class", "1,600 image labels (80 classes)", ("supervision=class", "test_untrained=true"))]
    for kind in ("pairs", "triplets"):
        for count in budgets:
            judgement = "same/different judgements" if kind == "pairs" else "triplet judgements"
            settings.append(
                Setting(f"{kind}_{count}", f"{count:,} {judgement}", (f"supervision={kind}",), tuples=(kind, count))
            )
    for method in ("simclr", "vicreg", "moco"):
        settings.append(Setting(f"none_{method}", "none", ("supervision=none", f"supervision.method={method}")))
    return settings


def tuples_file(out: Path, kind: str, count: int) -> Path:
    return out / "tuples" / f"{kind}_{count}.csv"


def run_study(
    out: str | Path,
    data_dir: str | Path,
    seeds: Sequence[int] = (0, 1),
    steps: int = 50,
    budgets: Sequence[int] = (400, 3200),
    frozen_reference: bool = True,
) -> None:
    """Trains every setting for every seed (seed-major: all settings of the first seed first), one at a time,
    then evaluates the frozen ImageNet reference.

    A run whose ``metrics.json`` exists is skipped, so running it again continues an interrupted study.
    """
    from metricsearch.pipelines.data_tools import make_tuples

    out, data_dir = Path(out).resolve(), Path(data_dir).resolve()
    settings = study_settings(budgets)
    for setting in settings:
        if setting.tuples is not None and not tuples_file(out, *setting.tuples).is_file():
            kind, count = setting.tuples
            tuples_file(out, kind, count).parent.mkdir(parents=True, exist_ok=True)
            overrides = [f"paths.data_dir={data_dir}", *DATA_OVERRIDES]
            make_tuples(overrides, kind, count, str(tuples_file(out, kind, count)), seed=0)
    for seed in seeds:
        for setting in settings:
            _train(out, data_dir, setting, seed, steps)
    if frozen_reference:
        _evaluate_frozen(out, data_dir)


def _run(cmd: list[str], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("running %s", " ".join(cmd))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(run_dir / "console.log", "w") as console:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=console, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        log.warning("%s failed (exit %d); see %s", run_dir.name, result.returncode, run_dir / "console.log")


def _train(out: Path, data_dir: Path, setting: Setting, seed: int, steps: int) -> None:
    run_dir = out / "runs" / setting.name / f"seed{seed}"
    if has_metrics(run_dir):
        return
    overrides = [
        *setting.overrides,
        *DATA_OVERRIDES,
        f"seed={seed}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=1000",
        f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "trainer.max_time=null",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        # NMI is not compared here; its k-means would only lengthen every evaluation.
        "module.compute_nmi=false",
        # No pictures: the projection of the test embeddings would cost more than a short run trains.
        "~callbacks.visualization",
    ]
    if "test_untrained=true" not in overrides:
        overrides.append("test_untrained=false")
    if setting.tuples is not None:
        kind, count = setting.tuples
        overrides.append(f"data.{kind}_file={tuples_file(out, kind, count)}")
    _run([sys.executable, "train.py", *overrides], run_dir)


def _evaluate_frozen(out: Path, data_dir: Path) -> None:
    run_dir = out / "runs" / FROZEN
    if has_metrics(run_dir):
        return
    cmd = [
        sys.executable,
        "scripts/evaluate.py",
        "backbone=efficientnet_lite0_imagenet",
        "data=synthetic",
        f"data.source.root={data_dir}",
        "data.source.image_size=32",
        f"out={run_dir}",
        "max_confusion_classes=0",
    ]
    _run(cmd, run_dir)


def collect_runs(out: str | Path, budgets: Sequence[int] = (400, 3200)) -> list[dict[str, Any]]:
    """One row per finished run and reference: setting, seed, labels, and the test metrics (as percentages)."""
    out = Path(out)
    rows = []
    for setting in study_settings(budgets):
        for run_dir in sorted((out / "runs" / setting.name).glob("seed*")):
            if not has_metrics(run_dir):
                continue
            summary = read_metrics(run_dir)
            seed = int(run_dir.name.removeprefix("seed"))
            test = summary["metrics"].get("test")
            if test is None:
                continue
            rows.append(_row(setting.name, seed, setting.labels, test, summary["selection"]["mode"]))
            if "untrained" in summary["metrics"] and setting.name == "class":
                rows.append(_row(UNTRAINED, seed, "none (no training)", summary["metrics"]["untrained"], "-"))
    frozen = out / "runs" / FROZEN
    if has_metrics(frozen):
        metrics = read_metrics(frozen)["metrics"]["test"]
        rows.append(_row(FROZEN, 0, "ImageNet labels (1.28M, not of this data)", metrics, "-"))
    return rows


def _row(setting: str, seed: int, labels: str, metrics: dict[str, float], selection: str) -> dict[str, Any]:
    return {
        "setting": setting,
        "seed": seed,
        "labels": labels,
        "selection": selection,
        **{metric: round(100 * float(metrics[metric]), 2) for metric in METRICS},
    }


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95% t-interval over seeds of each setting's metrics, in the order the settings first appear."""
    order = list(dict.fromkeys(row["setting"] for row in rows))
    summary = []
    for setting in order:
        runs = [row for row in rows if row["setting"] == setting]
        entry = {"setting": setting, "labels": runs[0]["labels"], "runs": len(runs)}
        for metric in METRICS:
            mean, low, high = mean_ci([row[metric] for row in runs])
            entry[metric] = round(mean, 2)
            entry[f"{metric}_half_interval"] = None if low != low else round((high - low) / 2, 2)
        summary.append(entry)
    return summary


def format_summary_markdown(summary: Sequence[dict[str, Any]]) -> str:
    lines = ["| setting | labels it costs | runs | R@1 | MAP@R |", "|---|---|---|---|---|"]
    for entry in summary:
        cells = []
        for metric in METRICS:
            half = entry[f"{metric}_half_interval"]
            cells.append(f"{entry[metric]:.2f}" + ("" if half is None else f" ± {half:.2f}"))
        lines.append(f"| `{entry['setting']}` | {entry['labels']} | {entry['runs']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def plot_summary(summary: Sequence[dict[str, Any]]) -> Any:
    """Bars of each setting's mean test R@1 and MAP@R with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [entry["setting"] for entry in summary]
    for axis, metric in zip(axes, METRICS, strict=True):
        means = [entry[metric] for entry in summary]
        errors = [entry[f"{metric}_half_interval"] or 0.0 for entry in summary]
        axis.bar(range(len(names)), means, yerr=errors, capsize=3, color="#4C72B0")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_ylabel(f"test {metric} (%)")
        axis.set_title(f"{metric}: mean and 95% interval over seeds")
    figure.tight_layout()
    return figure


def summarize_study(out: str | Path, results: str | Path, budgets: Sequence[int] = (400, 3200)) -> list[dict]:
    """Writes ``runs.csv``, ``summary.csv``, ``summary.md`` and ``supervision.png`` into ``results``."""
    rows = collect_runs(out, budgets)
    if not rows:
        raise FileNotFoundError(f"no finished run under {Path(out) / 'runs'}; run the study first")
    summary = summary_rows(rows)
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "runs.csv", _csv_text(rows))
    atomic_write_text(results / "summary.csv", _csv_text(summary))
    atomic_write_text(results / "summary.md", format_summary_markdown(summary))
    figure = plot_summary(summary)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(results / "supervision.png", buffer.getvalue())
    return summary
