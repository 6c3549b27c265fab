"""``make reproduce``: a loss x dataset x seed grid of training runs, resumable, summarized into ``results/``.

Every cell is one ``python train.py data=D loss=L seed=S hydra.run.dir=results/runs/D/L/seedS`` in a subprocess,
so a crash in one cell cannot take the grid down and every cell is an ordinary run folder. On the real datasets
(CUB, Cars196, SOP) the cells are the paper recipes of ``conf/experiment/`` instead (``python train.py
experiment=R seed=S``, folder ``results/runs/D/R/seedS``): pretrained backbones with the official settings, their
published numbers shown beside ours (see :mod:`metricsearch.utils.recipes`). A cell whose
``metrics.json`` exists is finished and skipped, which makes the grid safe to interrupt and run again; a cell
folder without one is the remains of an interrupted run: it continues from its ``last.ckpt`` (``resume=auto``),
or starts over when it has none. When all cells are done (or at any point, with ``aggregate_only``) the finished
cells are summarized into:

- ``results/results.md``: per dataset, mean ± std over seeds of Recall@K, MAP@R and R-Precision per loss;
- ``results/results.csv`` (the same, as fractions) and ``results/runs.csv`` (one row per cell);
- ``results/recall_at_1.png``: Recall@1 per loss and dataset with error bars.

Its command line is :mod:`metricsearch.cli.reproduce`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metricsearch.analysis.files import save_figure, write_csv
from metricsearch.analysis.results import (
    cell_dir,
    collect_results,
    format_results_markdown,
    plot_metric_bars,
    read_run_result,
    summarize_results,
    summary_csv_rows,
)
from metricsearch.analysis.run_folder import LAST_CHECKPOINT, REPRODUCE_INFO, REPRODUCE_LOG, read_metrics
from metricsearch.utils.atomic_io import atomic_write_text
from metricsearch.utils.config import CONFIG_DIR, REPO_ROOT, normalize_overrides
from metricsearch.utils.recipes import BACKBONE_WEIGHTS, published_recall_at_1, recipe_cards, recipes_for

# Seven losses covering the families: triplet / pair (triplet, contrastive, multi-similarity), batch-level
# contrastive (supcon), proxy (proxy_anchor) and classification (arcface, normalized_softmax).
DEFAULT_LOSSES = (
    "triplet",
    "contrastive",
    "multi_similarity",
    "supcon",
    "proxy_anchor",
    "arcface",
    "normalized_softmax",
)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_DATASETS = ("synthetic",)
# Datasets that need nothing on disk: generated (synthetic) or shipped with a package (digits).
BUILTIN_DATASETS = ("synthetic", "digits")
# A little shorter than `python train.py` (10 epochs): 8 epochs keep a cell near 2.5-3 minutes on two idle cores,
# so the default 7 losses x 3 seeds finish in about an hour (79 minutes measured, partly under load).
DEFAULT_SYNTHETIC_EPOCHS = 8
# Settings every cell of a dataset needs, whatever the grid (the data configs explain why).
# In-Shop items have as few training images as SOP's products, some a single one: two per item, repeated if need be.
DATASET_OVERRIDES: dict[str, list[str]] = {
    "sop": ["sampler.m=2"],
    "inshop": ["sampler.m=2", "sampler.replacement=true"],
}
# Every cell: CSV logs only, no untrained baseline (not in the tables), and only the final test set drawn, with
# PCA (UMAP's 10-20 s of compilation per process would add minutes to the grid).
COMMON_OVERRIDES = (
    "logger=csv",
    "test_untrained=false",
    "trainer.enable_progress_bar=false",
    "callbacks.visualization.every_n_epochs=0",
    "callbacks.visualization.method=pca",
    # Cells train a fixed number of epochs: the default run's wall-clock guard would make results machine-dependent.
    "trainer.max_time=null",
)


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    dataset: str
    loss: str
    seed: int
    # A paper recipe (conf/experiment name) that sets data, model, loss and schedule; then `loss` is its name.
    recipe: str | None = None

    def folder(self, results_dir: Path) -> Path:
        return cell_dir(results_dir, self.dataset, self.loss, self.seed)

    def __str__(self) -> str:
        return f"{self.dataset} / {self.loss} / seed {self.seed}"


def grid_cells(dataset: str, losses: Sequence[str] | None, seeds: Sequence[int]) -> list[Cell]:
    """The cells of one dataset: its paper recipes when it has any (restricted to ``losses`` when given), else
    one cell per loss (``losses``, or the default losses) and seed."""
    recipes = [] if dataset in BUILTIN_DATASETS else recipes_for(dataset, list(losses) if losses else None)
    if recipes:
        return [Cell(dataset, card.name, seed, recipe=card.name) for card in recipes for seed in dict.fromkeys(seeds)]
    return [
        Cell(dataset, loss, seed) for loss in dict.fromkeys(losses or DEFAULT_LOSSES) for seed in dict.fromkeys(seeds)
    ]


def dataset_availability(dataset: str, overrides: Sequence[str] = ()) -> tuple[bool, str]:
    """Whether a dataset can run here, and why not.

    Built-in datasets always can; the others need their ``conf/data/<name>.yaml`` and their data root on disk
    (``data.source.root`` as the config resolves it, with ``overrides`` such as ``paths.data_dir=...`` applied).
    """
    if not (CONFIG_DIR / "data" / f"{dataset}.yaml").is_file():
        return False, f"no conf/data/{dataset}.yaml"
    if dataset in BUILTIN_DATASETS:
        return True, "built in"
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=normalize_overrides([*overrides, f"data={dataset}"]))
        root = OmegaConf.select(cfg, "data.source.root")
    except Exception as exc:  # any composition error means the dataset cannot run here
        return False, f"its config does not compose ({type(exc).__name__}: {exc})"
    finally:
        GlobalHydra.instance().clear()
    if root is None:
        return False, "its config has no data.source.root"
    # Cells run from the repository root, so a relative root (the default ./data/...) is relative to it.
    root = Path(root).expanduser()
    if not (root if root.is_absolute() else REPO_ROOT / root).exists():
        return False, f"{root} not found (set paths.data_dir or data.source.root in EXTRA)"
    return True, str(root)


def cell_overrides(
    cell: Cell,
    results_dir: Path,
    epochs: int | None,
    extra: Sequence[str],
    weights: Mapping[str, str] | None = None,
) -> list[str]:
    """The Hydra overrides of one cell: grid settings, dataset needs, the cell itself, then the user's extras.

    ``weights`` maps a recipe backbone (a conf/backbone name, see ``BACKBONE_WEIGHTS``) to a local weights file:
    a recipe cell whose backbone has one gets it as ``backbone.weights_file`` (recipes of several backbones cannot
    share one ``backbone.weights_file`` in ``extra``).
    """
    overrides = list(COMMON_OVERRIDES)
    if cell.recipe is not None:
        # The recipe brings its own data, model, loss, sampler and schedule; only the grid's bookkeeping is added.
        overrides += [f"experiment={cell.recipe}", f"seed={cell.seed}"]
        if epochs is not None:
            overrides.append(f"trainer.max_epochs={epochs}")
        backbone = recipe_cards()[cell.recipe].backbone
        if weights and backbone in weights:
            overrides.append(f"backbone.weights_file={weights[backbone]}")
        overrides.append(f"hydra.run.dir={cell.folder(results_dir).resolve()}")
        return overrides + list(extra)
    if cell.dataset == "synthetic" and epochs is None:
        epochs = DEFAULT_SYNTHETIC_EPOCHS
    if epochs is not None:
        overrides.append(f"trainer.max_epochs={epochs}")
    overrides += DATASET_OVERRIDES.get(cell.dataset, [])
    overrides += [f"data={cell.dataset}", f"loss={cell.loss}", f"seed={cell.seed}"]
    overrides.append(f"hydra.run.dir={cell.folder(results_dir).resolve()}")
    return overrides + list(extra)


def is_finished(folder: Path) -> bool:
    """A cell is finished when its run wrote test metrics (``metrics.json`` is written last, atomically)."""
    return read_run_result(folder, "", "", 0) is not None


def run_cell(
    cell: Cell,
    overrides: list[str],
    folder: Path,
    timeout: float | None = None,
    finished: Callable[[Path], bool] = is_finished,
) -> tuple[bool, float]:
    """Trains one cell in a subprocess, its output appended to ``<cell>/reproduce.log``; returns (success, seconds).

    A cell interrupted during training left its ``last.ckpt`` behind and continues from it (``resume=auto``);
    a folder without one, or a resume that fails (a checkpoint cut off mid-write), starts over from scratch.
    ``finished`` tells a completed run folder (default: one with test metrics; ``make compare``'s search runs,
    which never test, pass their own).
    """
    start = time.perf_counter()
    resumable = (folder / LAST_CHECKPOINT).is_file()
    command = [*overrides, "resume=auto"] if resumable else overrides
    ok = _train(folder, command, timeout, fresh=not resumable, finished=finished)
    if not ok and resumable:
        ok = _train(folder, overrides, timeout, fresh=True, finished=finished)
    seconds = time.perf_counter() - start
    if ok:
        drop_resume_checkpoint(folder)
        info = {"seconds": round(seconds, 1), "overrides": overrides, "cell": cell.__dict__}
        atomic_write_text(folder / REPRODUCE_INFO, json.dumps(info, indent=1) + "\n")
    return ok, seconds


def drop_resume_checkpoint(folder: Path) -> bool:
    """Removes a finished cell's ``last.ckpt`` when the run selected another checkpoint; returns whether it did.

    ``last.ckpt`` only serves to continue an interrupted run, and a grid keeps one per cell: at full size (a
    ResNet-50 with its optimizer state) that is as much disk again as the selected checkpoints the cells keep.
    """
    last = folder / LAST_CHECKPOINT
    try:
        best = read_metrics(folder).get("best_checkpoint")
    except (OSError, ValueError, AttributeError):
        return False
    # metrics.json names it by an absolute path; a results folder that was moved still holds it by name.
    kept = last.parent / Path(best).name if best else None
    if kept is None or kept.name == last.name or not kept.is_file() or not last.is_file():
        return False
    last.unlink()
    return True


def _train(
    folder: Path, overrides: list[str], timeout: float | None, fresh: bool, finished: Callable[[Path], bool]
) -> bool:
    if fresh and folder.exists():
        # Remains of an interrupted run without a checkpoint to continue: start over rather than mix old files in.
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "train.py", *overrides]
    with open(folder / REPRODUCE_LOG, "a", encoding="utf-8") as log_file:
        log_file.write(shlex.join(command) + "\n\n")
        log_file.flush()
        try:
            result = subprocess.run(
                command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 0 and finished(folder)


def write_results(results_dir: Path, command: str = "") -> list:
    """Summarizes every finished cell under ``results_dir/runs`` into the markdown, CSV and plot files."""
    results = collect_results(results_dir)
    rows = summarize_results(results)
    runs = [
        {"dataset": r.dataset, "loss": r.loss, "seed": r.seed, "seconds": r.seconds or "", **r.metrics} for r in results
    ]
    write_csv(results_dir / "runs.csv", runs, _union_columns(runs))
    csv_rows, columns = summary_csv_rows(rows)
    write_csv(results_dir / "results.csv", csv_rows, columns)
    total = sum(r.seconds or 0.0 for r in results)
    datasets = sorted({r.dataset for r in results})
    cards = recipe_cards()
    for row in rows:
        if row.loss in cards:
            row.published = dict(cards[row.loss].published)
    header = (
        "## Reproduce: retrieval on unseen test classes\n\n"
        f"{len(results)} finished runs ({', '.join(datasets) or 'none'}); mean ± sample std over seeds, in %, on the "
        "test classes. Unless a selection column says otherwise, the tested model is the best checkpoint on "
        "validation classes held out of training (val); `last` tests the final model; `test_best` reports the best "
        "of the per-epoch test evaluations, as the papers did: optimistic. Paper recipes show the published R@1."
    )
    footer_lines = [f"Training time of these runs: {total / 60:.1f} min in total ({_per_run(total, results)} per run)."]
    if command:
        footer_lines.append(f"Command: `{command}`")
    markdown = format_results_markdown(rows, header=header, footer="\n".join(footer_lines))
    atomic_write_text(results_dir / "results.md", markdown)
    if rows:
        save_figure(plot_metric_bars(rows, "recall@1"), results_dir / "recall_at_1.png")
    return rows


def run_grid(
    datasets: Sequence[str],
    losses: Sequence[str] | None,
    seeds: Sequence[int],
    results_dir: Path,
    *,
    epochs: int | None = None,
    extra: Sequence[str] = (),
    weights: Mapping[str, str] | None = None,
    timeout: float | None = None,
    dry_run: bool = False,
    console: Console | None = None,
) -> list[Cell]:
    """Runs every unfinished cell of the grid (datasets that cannot run here are left out, with the reason).

    Returns:
        The cells that failed.
    """
    console = console or Console()
    available = []
    for dataset in dict.fromkeys(datasets):
        ok, reason = dataset_availability(dataset, extra)
        if ok:
            available.append(dataset)
        else:
            console.print(f"[yellow]skipping dataset {dataset}: {reason}[/yellow]")
    cells = [cell for dataset in available for cell in grid_cells(dataset, losses, seeds)]
    _say_weights_needed(cells, weights or {}, console)
    failed: list[Cell] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("reproduce", total=len(cells))
        for i, cell in enumerate(cells, start=1):
            folder = cell.folder(results_dir)
            overrides = cell_overrides(cell, results_dir, epochs, extra, weights)
            progress.update(task, description=f"cell {i}/{len(cells)}: {cell}")
            if is_finished(folder):
                _warn_if_settings_changed(folder, overrides, cell, console)
                progress.console.print(f"skip   {cell} (finished)")
            elif dry_run:
                progress.console.print(f"would run {cell}: python train.py {shlex.join(overrides)}")
            else:
                ok, seconds = run_cell(cell, overrides, folder, timeout)
                if ok:
                    progress.console.print(f"done   {cell} in {seconds:.0f} s")
                else:
                    failed.append(cell)
                    progress.console.print(
                        f"[red]failed {cell} after {seconds:.0f} s: see {folder / REPRODUCE_LOG}[/red]"
                    )
            progress.advance(task)
    return failed


def reproduce(
    datasets: Sequence[str] = DEFAULT_DATASETS,
    losses: Sequence[str] | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    results_dir: str | Path | None = None,
    *,
    epochs: int | None = None,
    extra: Sequence[str] = (),
    weights: Mapping[str, str] | None = None,
    timeout: float | None = None,
    dry_run: bool = False,
    aggregate_only: bool = False,
    command: str = "",
) -> int:
    """Runs the grid's unfinished cells, then rewrites the tables; returns the exit status (1: some cells failed).

    Args:
        datasets: conf/data names; real datasets run only when their data is on disk.
        losses: conf/loss names (none: :data:`DEFAULT_LOSSES` on built-in data, every recipe on real datasets; on
            a real dataset, only the recipes of these losses).
        seeds: the seeds of every (dataset, loss).
        results_dir: where ``runs/`` and the tables go (default: the repository's ``results/``).
        epochs: ``trainer.max_epochs`` of every cell (default: 8 on synthetic, conf/trainer's elsewhere).
        extra: Hydra overrides added to every cell.
        weights: conf/backbone name -> local weights file, given to the recipes of that backbone (offline runs).
        timeout: seconds after which a cell counts as failed.
        dry_run: list the cells and their commands, run nothing.
        aggregate_only: only rewrite the tables from finished cells.
        command: the command line, recorded in ``results.md``.
    """
    console = Console()
    results_dir = Path(results_dir or REPO_ROOT / "results").resolve()
    failed: list[Cell] = []
    if not aggregate_only:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        start = time.perf_counter()
        failed = run_grid(
            datasets,
            losses,
            seeds,
            results_dir,
            epochs=epochs,
            extra=extra,
            weights=weights,
            timeout=timeout,
            dry_run=dry_run,
            console=console,
        )
        console.print(f"grid pass took {(time.perf_counter() - start) / 60:.1f} min")
    if dry_run:
        return 0
    rows = write_results(results_dir, command)
    console.print(results_table(rows))
    comparison = recipe_comparison_table(rows)
    if comparison is not None:
        console.print(comparison)
    console.print(f"wrote {results_dir / 'results.md'} ({len(rows)} loss x dataset rows)")
    if failed:
        console.print(f"[red]{len(failed)} cells failed; rerun the same command to retry them[/red]")
        return 1
    return 0


def results_table(rows: Sequence) -> Table:
    """The summary the run wrote to results.md, for the console: Recall@1 and MAP@R per dataset and loss."""
    table = Table(title="Reproduce: test classes, mean ± std over seeds (%)")
    for title in ("dataset", "loss / recipe", "seeds", "selection", "R@1", "MAP@R"):
        table.add_column(title, justify="right" if title in ("seeds", "R@1", "MAP@R") else "left")
    for row in rows:
        table.add_row(
            row.dataset,
            row.loss,
            str(len(row.seeds)),
            row.selection,
            _percent(row.mean.get("recall@1"), row.std.get("recall@1")),
            _percent(row.mean.get("map@r"), row.std.get("map@r")),
        )
    return table


def recipe_comparison_table(rows: Sequence) -> Table | None:
    """Each paper recipe's Recall@1 beside the published one and the row that number comes from (None: no recipe
    ran). A recipe without a verified number says so rather than showing another model's."""
    cards = recipe_cards()
    recipe_rows = [row for row in rows if row.loss in cards]
    if not recipe_rows:
        return None
    table = Table(title="Paper recipes: ours vs published Recall@1 (published rows from the recipe cards)")
    for title in ("recipe", "ours R@1", "published R@1", "published row", "expected gap (by reading)"):
        table.add_column(title, justify="right" if "R@1" in title else "left", overflow="fold")
    for row in recipe_rows:
        card = cards[row.loss]
        ours = _percent(row.mean.get("recall@1"), row.std.get("recall@1"))
        table.add_row(
            row.loss, f"{ours} ({row.selection})", published_recall_at_1(card), card.published_row, card.expected_gap
        )
    return table


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f} ± {100 * (std or 0.0):.1f}"


def _say_weights_needed(cells: Sequence[Cell], weights: Mapping[str, str], console: Console) -> None:
    """Names the pretrained weights the grid's recipes load, and whether each comes from a local file."""
    backbones = {recipe_cards()[c.recipe].backbone: None for c in cells if c.recipe is not None}
    for backbone in backbones:
        if backbone is None:
            continue
        source = f"from {weights[backbone]}" if backbone in weights else "from the hub (offline: WEIGHTS=...)"
        console.print(f"recipes on {backbone} load {BACKBONE_WEIGHTS.get(backbone, 'its pretrained weights')} {source}")


def _union_columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _per_run(total: float, results: Sequence) -> str:
    return f"{total / len(results) / 60:.1f} min" if results else "-"


def _warn_if_settings_changed(folder: Path, overrides: list[str], cell: Cell, console: Console) -> None:
    """A finished cell trained with other settings (epochs, extras) is kept; say so, since its numbers differ."""
    try:
        previous = json.loads((folder / REPRODUCE_INFO).read_text(encoding="utf-8"))["overrides"]
    except (OSError, ValueError, KeyError):
        return
    if previous != overrides:
        console.print(f"[yellow]note: {cell} was trained with other settings; delete {folder} to retrain it[/yellow]")
