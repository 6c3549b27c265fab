"""The measured comparison of supervision settings (``scripts/supervision_study.py``), in two variants.

Within a variant every setting trains the same backbone on the images of the same training classes for the same
number of optimizer steps of equally large batches, and is tested on the same test images: ``class`` (every training
image labelled), ``pairs`` and ``triplets`` at two tuple budgets (files drawn by ``scripts/make_tuples.py``), and
``none`` with each self-supervised method. The untrained network (each class run's own untrained evaluation) and an
ImageNet-pretrained EfficientNet-Lite0 used as it is (no training, its own 224 px preprocessing) are the references.

- ``builtin``: the default run's resnet10t from scratch on the built-in data drawn at 32 px, 64-image batches, tested
  on the 100 unseen test classes (zero-shot).
- ``cifar_standin``: the seed example (``experiment=seed_cifar10``: its small CNN, 8-d head, Adam, 20-image batches)
  on its CIFAR-10 stand-in (``data=synthetic_cifar``), tested on the held-out images of the same 10 classes
  (closed set); every setting validates at the same steps.

Runs go one at a time, each a ``python train.py`` subprocess with its own run folder, so an interrupted study
continues where it stopped; :func:`summarize_study` turns whatever finished into the per-run CSV, the mean and 95%
Student-t interval over seeds per setting, a Markdown table and a plot.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metricsearch.analysis.compare import mean_ci
from metricsearch.analysis.run_folder import has_metrics, read_metrics
from metricsearch.utils.atomic_io import atomic_write_bytes, atomic_write_text
from metricsearch.utils.config import REPO_ROOT

log = logging.getLogger(__name__)

METRICS = ("recall@1", "map@r")
UNTRAINED, FROZEN = "untrained", "imagenet_frozen"
METHODS = ("simclr", "vicreg", "moco")
# Settings that name their loss themselves, for a variant whose experiment chooses another (the seed example's).
LOSSES = {
    "pairs": ("loss=contrastive", "miner=none"),
    "triplets": ("loss=triplet", "miner=none"),
    "none": ("~loss",),
}


@dataclass(frozen=True)
class Variant:
    """Where a study runs: its data, the model and optimizer every setting shares, and its training schedule.

    Attributes:
        name: the ``dataset=`` value of ``scripts/supervision_study.py``.
        out: default folder of its runs and tuples files.
        results: default folder of its tables and plot.
        data: overrides naming its data, for ``train.py`` and ``make_tuples.py`` alike.
        shared: overrides of every trained setting (backbone, head, optimizer, batch size, schedule).
        class_labels: what the ``class`` setting costs in labels.
        steps: the default optimizer steps of every trained run.
        name_losses: whether each setting names its loss (:data:`LOSSES`), because ``shared`` picks an experiment
            whose loss would otherwise win over the one the ``supervision`` option chooses.
        steps_per_epoch: cap of every setting's epoch (the ``class`` run's epoch); None: validate every
            ``steps // validations`` steps instead, across epochs.
        validations: how many validations a run of ``steps_per_epoch=None`` makes.
        self_supervised: overrides of the ``none`` settings only.
        frozen: ``scripts/evaluate.py`` overrides of the ImageNet reference, after its data root.
    """

    name: str
    out: str
    results: str
    data: tuple[str, ...]
    shared: tuple[str, ...]
    class_labels: str
    steps: int
    name_losses: bool = False
    steps_per_epoch: int | None = None
    validations: int = 8
    self_supervised: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()

    def schedule(self, steps: int) -> list[str]:
        """The trainer overrides of a run of ``steps`` optimizer steps."""
        if self.steps_per_epoch is not None:
            return [f"trainer.limit_train_batches={self.steps_per_epoch}"]
        every = max(1, steps // self.validations)
        return [f"trainer.val_check_interval={every}", "trainer.check_val_every_n_epoch=null"]


VARIANTS = {
    "builtin": Variant(
        name="builtin",
        out="outputs/supervision_study",
        results="results/supervision",
        # The built-in data drawn at 32 px (its 200 classes x 20 images, the default split): a quarter of the
        # default 64 px cost, so that every setting and seed fits a shared two-core machine.
        data=("data.source.image_size=32", "data.image_size=32", "data.resize_size=32"),
        shared=(),
        class_labels="1,600 image labels (80 classes)",
        steps=300,
        # The class run's epoch: 1,600 training images / 64.
        steps_per_epoch=25,
        # MoCo's queue at half the 1,600 training images, so it rarely holds an older key of the query's own image.
        self_supervised=("supervision.queue_size=800",),
        frozen=("data=synthetic", "data.source.image_size=32"),
    ),
    "cifar_standin": Variant(
        name="cifar_standin",
        out="outputs/supervision_study_cifar_standin",
        results="results/supervision/cifar_standin",
        data=("data=synthetic_cifar",),
        shared=(
            "experiment=seed_cifar10",
            # The tiny network waits on decoding, not on the cores: no worker processes to start every epoch.
            "data.num_workers=0",
            # Drawn after every epoch; the tuple and self-supervised epochs here are a few dozen steps.
            "~callbacks.loss_curve",
        ),
        class_labels="800 image labels (10 classes)",
        # A tenth of the seed example's 20 epochs of 1,000 batches.
        steps=2000,
        name_losses=True,
        # MoCo's queue at half the 800 training images, so it rarely holds an older key of the query's own image.
        self_supervised=("supervision.queue_size=400",),
        frozen=("data=synthetic_cifar",),
    ),
}


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: its name, what it costs in labels, and the train.py overrides that make it."""

    name: str
    labels: str
    overrides: tuple[str, ...] = ()
    tuples: tuple[str, int] | None = None


def study_settings(budgets: Sequence[int] = (400, 3200), variant: Variant = VARIANTS["builtin"]) -> list[Setting]:
    """The trained settings, in the order they run and are shown."""

    def named(kind: str) -> tuple[str, ...]:
        return LOSSES[kind] if variant.name_losses else ()

    settings = [Setting("class", variant.class_labels, ("supervision=class", "test_untrained=true"))]
    for kind in ("pairs", "triplets"):
        for count in budgets:
            judgement = "same/different judgements" if kind == "pairs" else "triplet judgements"
            overrides = (f"supervision={kind}", *named(kind))
            settings.append(Setting(f"{kind}_{count}", f"{count:,} {judgement}", overrides, tuples=(kind, count)))
    for method in METHODS:
        overrides = ("supervision=none", f"supervision.method={method}", *named("none"), *variant.self_supervised)
        settings.append(Setting(f"none_{method}", "none", overrides))
    return settings


def tuples_file(out: Path, kind: str, count: int) -> Path:
    return out / "tuples" / f"{kind}_{count}.csv"


def run_folder(out: Path, setting: str, seed: int) -> Path:
    """The run folder of one setting and seed of the study."""
    return out / "runs" / setting / f"seed{seed}"


def run_study(
    out: str | Path,
    data_dir: str | Path,
    seeds: Sequence[int] = (0, 1),
    steps: int | None = None,
    budgets: Sequence[int] = (400, 3200),
    frozen_reference: bool = True,
    variant: Variant = VARIANTS["builtin"],
    settings: Sequence[str] | None = None,
) -> None:
    """Trains every setting for every seed (seed-major: all settings of the first seed first), one at a time,
    then evaluates the frozen ImageNet reference.

    A run whose ``metrics.json`` exists is skipped, so running it again continues an interrupted study.

    Args:
        steps: optimizer steps of every trained run (default: the variant's).
        settings: the names of the settings to train (default: all of :func:`study_settings`).
    """
    from metricsearch.pipelines.data_tools import make_tuples

    out, data_dir = Path(out).resolve(), Path(data_dir).resolve()
    steps = variant.steps if steps is None else steps
    chosen = [s for s in study_settings(budgets, variant) if settings is None or s.name in settings]
    for setting in chosen:
        if setting.tuples is None or tuples_file(out, *setting.tuples).is_file():
            continue
        kind, count = setting.tuples
        file = tuples_file(out, kind, count)
        file.parent.mkdir(parents=True, exist_ok=True)
        # Drawn from the training images: a held-out 20% of the training classes (or, under the closed set, of
        # every class's training images) is named by no tuple and selects the checkpoints.
        make_tuples([f"paths.data_dir={data_dir}", *variant.data], kind, count, str(file), seed=0)
    for seed in seeds:
        for setting in chosen:
            _train(out, data_dir, setting, seed, steps, variant)
    if frozen_reference:
        _evaluate_frozen(out, data_dir, variant)


def _run(cmd: list[str], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("running %s", " ".join(cmd))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(run_dir / "console.log", "w") as console:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=console, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        log.warning("%s failed (exit %d); see %s", run_dir.name, result.returncode, run_dir / "console.log")


def train_overrides(
    out: Path, data_dir: Path, setting: Setting, seed: int, steps: int, variant: Variant = VARIANTS["builtin"]
) -> list[str]:
    """The ``train.py`` overrides of one run of the study."""
    overrides = [
        *variant.shared,
        *setting.overrides,
        *variant.data,
        f"seed={seed}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_folder(out, setting.name, seed)}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=1000",
        *variant.schedule(steps),
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
    return overrides


def _train(out: Path, data_dir: Path, setting: Setting, seed: int, steps: int, variant: Variant) -> None:
    run_dir = run_folder(out, setting.name, seed)
    if has_metrics(run_dir):
        return
    _run([sys.executable, "train.py", *train_overrides(out, data_dir, setting, seed, steps, variant)], run_dir)


def _evaluate_frozen(out: Path, data_dir: Path, variant: Variant) -> None:
    run_dir = out / "runs" / FROZEN
    if has_metrics(run_dir):
        return
    cmd = [
        sys.executable,
        "scripts/evaluate.py",
        "backbone=efficientnet_lite0_imagenet",
        *variant.frozen,
        f"data.source.root={data_dir}",
        f"out={run_dir}",
        "max_confusion_classes=0",
    ]
    _run(cmd, run_dir)


def collect_runs(
    out: str | Path, budgets: Sequence[int] = (400, 3200), variant: Variant = VARIANTS["builtin"]
) -> list[dict[str, Any]]:
    """One row per finished run and reference: setting, seed, labels, selection, optimizer steps (0 for the
    references) and the test metrics (as percentages)."""
    out = Path(out)
    rows = []
    for setting in study_settings(budgets, variant):
        for run_dir in sorted((out / "runs" / setting.name).glob("seed*")):
            if not has_metrics(run_dir):
                continue
            summary = read_metrics(run_dir)
            seed = int(run_dir.name.removeprefix("seed"))
            test = summary["metrics"].get("test")
            if test is None:
                continue
            steps = int(summary.get("global_step", 0))
            rows.append(_row(setting.name, seed, setting.labels, test, summary["selection"]["mode"], steps))
            if "untrained" in summary["metrics"] and setting.name == "class":
                rows.append(_row(UNTRAINED, seed, "none (no training)", summary["metrics"]["untrained"], "-", 0))
    frozen = out / "runs" / FROZEN
    if has_metrics(frozen):
        metrics = read_metrics(frozen)["metrics"]["test"]
        rows.append(_row(FROZEN, 0, "ImageNet labels (1.28M, not of this data)", metrics, "-", 0))
    return rows


def _row(setting: str, seed: int, labels: str, metrics: dict[str, float], selection: str, steps: int) -> dict[str, Any]:
    return {
        "setting": setting,
        "seed": seed,
        "labels": labels,
        "selection": selection,
        "steps": steps,
        **{metric: round(100 * float(metrics[metric]), 2) for metric in METRICS},
    }


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95% t-interval over seeds of each setting's metrics, in the order the settings first appear, with
    the seeds and the optimizer steps of its runs."""
    order = list(dict.fromkeys(row["setting"] for row in rows))
    summary = []
    for setting in order:
        runs = [row for row in rows if row["setting"] == setting]
        entry = {
            "setting": setting,
            "labels": runs[0]["labels"],
            "runs": len(runs),
            "seeds": " ".join(str(seed) for seed in sorted(int(row["seed"]) for row in runs)),
            "steps": " ".join(str(steps) for steps in sorted({int(row.get("steps", 0)) for row in runs})),
        }
        for metric in METRICS:
            mean, low, high = mean_ci([row[metric] for row in runs])
            entry[metric] = round(mean, 2)
            entry[f"{metric}_half_interval"] = None if low != low else round((high - low) / 2, 2)
        summary.append(entry)
    return summary


def _steps_line(summary: Sequence[dict[str, Any]]) -> str:
    """What the trained runs' optimizer steps were, as one sentence."""
    trained = sorted({int(s) for entry in summary for s in str(entry["steps"]).split() if int(s) > 0})
    if not trained:
        return "No trained run has finished."
    if len(trained) == 1:
        return f"Every trained run: {trained[0]:,} optimizer steps."
    listed = ", ".join(f"{steps:,}" for steps in trained)
    return f"The trained runs did not take one number of optimizer steps ({listed}): not comparable as they stand."


def format_summary_markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mean ± half-width of the 95% interval; the seeds of each setting), followed
    by a line stating the optimizer steps of the trained runs."""
    lines = ["| setting | labels it costs | seeds | R@1 | MAP@R |", "|---|---|---|---|---|"]
    for entry in summary:
        cells = []
        for metric in METRICS:
            half = entry[f"{metric}_half_interval"]
            cells.append(f"{entry[metric]:.2f}" + ("" if half is None else f" ± {half:.2f}"))
        seeds = ", ".join(str(entry["seeds"]).split()) if entry["setting"] != FROZEN else "-"
        lines.append(f"| `{entry['setting']}` | {entry['labels']} | {seeds} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n\n" + _steps_line(summary) + "\n"


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


def summarize_study(
    out: str | Path,
    results: str | Path,
    budgets: Sequence[int] = (400, 3200),
    variant: Variant = VARIANTS["builtin"],
) -> list[dict]:
    """Writes ``runs.csv``, ``summary.csv``, ``summary.md`` and ``supervision.png`` into ``results``."""
    rows = collect_runs(out, budgets, variant)
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
