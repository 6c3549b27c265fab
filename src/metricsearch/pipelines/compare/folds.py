"""Fold runs: one ``python train.py`` of the protocol (a search fold of a trial, or a final fold), its overrides,
its folder and whether it has finished."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from metricsearch.analysis.run_folder import CHECKPOINT_DIR, REPRODUCE_LOG, TEST_EMBEDDINGS_FILE, read_metrics
from metricsearch.pipelines.compare.space import Protocol, SearchSpace, param_overrides
from metricsearch.pipelines.reproduce import COMMON_OVERRIDES, is_finished, run_cell

SEARCH, TUNED, DEFAULT = "search", "tuned", "default"


@dataclass(frozen=True)
class FoldRun:
    """One training run of the protocol: a search fold of a trial, or a final fold of the tuned or default setting."""

    dataset: str
    loss: str
    kind: str
    fold: int
    seed: int
    key: str = ""

    def folder(self, results_dir: Path) -> Path:
        base = Path(results_dir) / self.dataset / self.loss
        if self.kind == SEARCH:
            return base / SEARCH / self.key / f"fold{self.fold}"
        setting = f"{TUNED}-{self.key}" if self.kind == TUNED else DEFAULT
        return base / "final" / setting / f"seed{self.seed}" / f"fold{self.fold}"

    def __str__(self) -> str:
        what = f"trial {self.key}" if self.kind == SEARCH else f"{self.kind} seed {self.seed}"
        return f"{self.dataset} / {self.loss} / {what} / fold {self.fold}"


def uses_wandb(extra: Sequence[str]) -> bool:
    """Whether ``extra`` switches W&B logging on (``logger=wandb``, or ``logger=many`` which includes it)."""
    for override in extra:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "logger" and value in ("wandb", "many"):
            return True
    return False


def run_overrides(
    run: FoldRun,
    protocol: Protocol,
    space_overrides: Sequence[str],
    params: Mapping[str, Any],
    results_dir: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """The Hydra overrides of one fold run: shared settings, the dataset's, the loss and its setting, the fold and
    seed, the test (final runs only), then the user's extras last."""
    overrides = [*COMMON_OVERRIDES, f"monitor={protocol.monitor}"]
    epochs = protocol.epochs_for(run.dataset)
    if epochs is not None:
        overrides.append(f"trainer.max_epochs={epochs}")
    if protocol.image_size is not None:
        overrides.append(f"data.image_size={protocol.image_size}")
        if run.dataset == "synthetic":
            overrides += [f"data.source.image_size={protocol.image_size}", f"data.resize_size={protocol.image_size}"]
    overrides += protocol.dataset_overrides.get(run.dataset, ())
    overrides += [f"data={run.dataset}", f"loss={run.loss}", *space_overrides, *param_overrides(params)]
    overrides += [f"data.num_folds={protocol.folds}", f"data.fold={run.fold}", f"seed={run.seed}"]
    # The search never evaluates the test classes; the final runs test once and keep their embeddings.
    overrides += ["test=false"] if run.kind == SEARCH else ["test=true", "save_test_embeddings=true"]
    if uses_wandb(extra):
        job = SEARCH if run.kind == SEARCH else "final"
        name = f"{run.loss}-{run.kind}-{run.key or 'default'}-seed{run.seed}-fold{run.fold}"
        overrides += [
            f"logger.wandb.group={run.dataset}/{run.loss}",
            f"logger.wandb.job_type={job}",
            f"logger.wandb.name={name}",
        ]
    overrides.append(f"hydra.run.dir={run.folder(results_dir).resolve()}")
    return overrides + list(extra)


def validation_score(folder: Path, monitor: str) -> float | None:
    """The monitored validation value of the checkpoint a finished run selected (``metrics.json`` ``val_best``)."""
    try:
        summary = read_metrics(folder)
        return float(summary["metrics"]["val_best"][monitor.split("/", 1)[1]])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def final_finished(folder: Path) -> bool:
    """A final run is finished when it wrote its test metrics and its test embeddings."""
    return is_finished(folder) and (folder / TEST_EMBEDDINGS_FILE).is_file()


class FoldRunFailed(RuntimeError):
    """A fold run's ``python train.py`` failed; its log is named in the message."""


@dataclass
class Context:
    """What every fold run of one comparison shares."""

    protocol: Protocol
    results_dir: Path
    extra: tuple[str, ...]
    timeout: float | None
    console: Console
    lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, message: str) -> None:
        with self.lock:
            self.console.print(message, highlight=False)


def ensure_run(run: FoldRun, space: SearchSpace, params: Mapping[str, Any], ctx: Context) -> Path:
    """Trains ``run`` unless its folder is finished; returns the folder.

    Raises:
        FoldRunFailed: the training subprocess failed.
    """
    folder = run.folder(ctx.results_dir)
    finished = (
        (lambda f: validation_score(f, ctx.protocol.monitor) is not None) if run.kind == SEARCH else final_finished
    )
    if finished(folder):
        ctx.say(f"skip   {run} (finished)")
        return folder
    overrides = run_overrides(run, ctx.protocol, space.overrides, params, ctx.results_dir, ctx.extra)
    ok, seconds = run_cell(run, overrides, folder, ctx.timeout, finished=finished)
    if not ok:
        raise FoldRunFailed(f"{run} failed after {seconds:.0f} s: see {folder / REPRODUCE_LOG}")
    if run.kind == SEARCH:
        # A search run's checkpoints serve no later step (only its validation score does): free the disk.
        shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)
        score = validation_score(folder, ctx.protocol.monitor)
        ctx.say(f"done   {run} in {seconds:.0f} s ({ctx.protocol.monitor} {score:.4f})")
    else:
        ctx.say(f"done   {run} in {seconds:.0f} s")
    return folder
