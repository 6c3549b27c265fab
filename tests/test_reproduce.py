"""`make reproduce` on a tiny grid, end to end: runs, skips finished cells, restarts interrupted ones, summarizes."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metricsearch.analysis.results import RunResult, format_results_markdown, summarize_results
from metricsearch.pipelines.reproduce import (
    Cell,
    cell_overrides,
    dataset_availability,
    drop_resume_checkpoint,
    grid_cells,
    recipe_comparison_table,
    results_table,
)
from tests.helpers import REPO_ROOT, TINY


def run_reproduce(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "scripts/reproduce.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_summary_is_mean_and_sample_std_over_seeds():
    results = [
        RunResult("synthetic", "triplet", 0, {"recall@1": 0.5, "recall@2": 0.6, "map@r": 0.2, "r_precision": 0.3}),
        RunResult("synthetic", "triplet", 1, {"recall@1": 0.7, "recall@2": 0.8, "map@r": 0.4, "r_precision": 0.5}),
        RunResult("synthetic", "supcon", 0, {"recall@1": 0.9, "recall@2": 0.95, "map@r": 0.5, "r_precision": 0.6}),
    ]
    rows = summarize_results(results)
    assert [r.loss for r in rows] == ["supcon", "triplet"]  # best Recall@1 first
    triplet = rows[1]
    assert triplet.seeds == [0, 1]
    assert triplet.mean["recall@1"] == pytest.approx(0.6)
    assert triplet.std["recall@1"] == pytest.approx(0.1414213, abs=1e-6)  # ddof=1
    table = format_results_markdown(rows)
    assert "| loss | seeds | R@1 | R@2 | MAP@R | R-Precision |" in table
    assert "| triplet | 2 | 60.0 ± 14.1 | 70.0 ± 14.1 | 30.0 ± 14.1 | 40.0 ± 14.1 |" in table
    assert "| supcon | 1 | 90.0 | 95.0 | 50.0 | 60.0 |" in table


def test_cells_get_the_short_setting_and_the_users_extras_last(tmp_path):
    overrides = cell_overrides(Cell("synthetic", "triplet", 1), tmp_path, None, ["trainer.max_epochs=2"])
    assert overrides.index("trainer.max_epochs=8") < overrides.index("trainer.max_epochs=2")
    assert {
        "data=synthetic",
        "loss=triplet",
        "seed=1",
        f"hydra.run.dir={tmp_path / 'runs/synthetic/triplet/seed1'}",
    } <= set(overrides)
    assert "sampler.m=2" in cell_overrides(Cell("sop", "triplet", 0), tmp_path, None, [])
    assert {"sampler.m=2", "sampler.replacement=true"} <= set(
        cell_overrides(Cell("inshop", "triplet", 0), tmp_path, None, [])
    )


def test_real_datasets_run_their_paper_recipes_and_builtin_data_the_losses():
    cub = {cell.loss for cell in grid_cells("cub", None, [0])}
    assert {"cub_proxy_anchor_r50", "cub_proxy_anchor_bninception", "cub_multi_similarity_bninception"} <= cub
    assert all(cell.recipe == cell.loss for cell in grid_cells("cub", None, [0]))
    assert {cell.loss for cell in grid_cells("sop", ["proxy_anchor"], [0, 1])} == {"sop_proxy_anchor_bninception"}
    assert len(grid_cells("sop", ["proxy_anchor"], [0, 1])) == 2
    assert [c.loss for c in grid_cells("synthetic", ["triplet", "arcface"], [0])] == ["triplet", "arcface"]
    # A real dataset without a recipe of the asked loss falls back to the plain loss grid.
    assert [(c.loss, c.recipe) for c in grid_cells("cub", ["lifted_structure"], [0])] == [("lifted_structure", None)]


def test_a_recipe_cell_runs_the_experiment_with_the_users_extras_last(tmp_path):
    cell = Cell("cub", "cub_proxy_anchor_r50", 2, recipe="cub_proxy_anchor_r50")
    overrides = cell_overrides(cell, tmp_path, None, ["trainer.max_epochs=3"])
    assert "experiment=cub_proxy_anchor_r50" in overrides and "seed=2" in overrides
    assert not any(o.startswith(("data=", "loss=", "sampler.")) for o in overrides)
    assert overrides[-1] == "trainer.max_epochs=3"
    assert f"hydra.run.dir={tmp_path / 'runs/cub/cub_proxy_anchor_r50/seed2'}" in overrides


def test_the_table_shows_the_selection_and_the_published_number():
    metrics = {"recall@1": 0.688, "map@r": 0.25, "r_precision": 0.36}
    rows = summarize_results(
        [
            RunResult("cub", "cub_proxy_anchor_r50", 0, metrics, selection="test_best"),
            RunResult("cub", "triplet", 0, {**metrics, "recall@1": 0.6}),
        ]
    )
    rows[0].published = {"recall@1": 69.9}
    table = format_results_markdown(rows)
    assert "| loss | seeds | selection | paper R@1 | R@1 | MAP@R | R-Precision |" in table
    assert "| cub_proxy_anchor_r50 | 1 | test_best (optimistic) | 69.9 | 68.8 | 25.0 | 36.0 |" in table
    assert "| triplet | 1 | val |  | 60.0 |" in table


def test_each_recipe_cell_gets_the_weights_file_of_its_own_backbone(tmp_path):
    weights = {"bn_inception": "/w/bn_inception-52deb4733.pth", "resnet50_tv": "/w/resnet50.pth"}

    def weights_file(recipe: str) -> list[str]:
        overrides = cell_overrides(Cell("cub", recipe, 0, recipe=recipe), tmp_path, None, [], weights)
        return [o for o in overrides if o.startswith("backbone.weights_file=")]

    assert weights_file("cub_proxy_anchor_bninception") == ["backbone.weights_file=/w/bn_inception-52deb4733.pth"]
    assert weights_file("cub_proxy_anchor_r50") == ["backbone.weights_file=/w/resnet50.pth"]
    assert weights_file("cub_ntxent_vits_dino") == []  # no file given for its backbone: the hub
    assert "backbone.weights_file" not in " ".join(
        cell_overrides(Cell("cub", "triplet", 0), tmp_path, None, [], weights)
    )


def test_the_printed_tables_put_each_recipe_beside_its_published_row_and_never_another_models_number():
    from rich.console import Console

    metrics = {"recall@1": 0.688, "map@r": 0.25, "r_precision": 0.36}
    rows = summarize_results(
        [
            RunResult("cub", "cub_proxy_anchor_r50", 0, metrics, selection="test_best"),
            RunResult(
                "sop", "sop_multi_similarity_bninception", 0, {**metrics, "recall@1": 0.75}, selection="test_best"
            ),
            RunResult("cub", "triplet", 0, {**metrics, "recall@1": 0.6}),
        ]
    )
    console = Console(record=True, width=400)
    console.print(results_table(rows))
    console.print(recipe_comparison_table(rows))
    lines = console.export_text().splitlines()
    proxy_anchor = next(line for line in lines if "cub_proxy_anchor_r50" in line and "69.9" in line)
    # The row's source alias is spelled out as the repository at its commit.
    assert (
        "68.8" in proxy_anchor
        and "tjddus9597/Proxy-Anchor-CVPR2020@51db570:README.md:80" in proxy_anchor
        and "ResNet-50, 512-d" in proxy_anchor
    )
    multi_similarity = [line for line in lines if "sop_multi_similarity_bninception" in line]
    assert any("not verified" in line for line in multi_similarity)
    assert not any("78.2" in line for line in lines)
    assert any("triplet" in line and "60.0" in line for line in lines)  # the whole summary, not only recipes
    assert recipe_comparison_table([row for row in rows if row.loss == "triplet"]) is None


def test_weights_for_an_unknown_backbone_is_a_usage_error(tmp_path):
    result = run_reproduce(["--weights", "resnet50=/w/r50.pth", "--dry-run", "--results-dir", str(tmp_path)])
    assert result.returncode == 2
    assert "error: weights=resnet50=/w/r50.pth" in result.stderr and "bn_inception" in result.stderr


def test_dry_run_lists_the_recipes_of_a_dataset_on_disk(tmp_path):
    (tmp_path / "CUB_200_2011").mkdir()
    result = run_reproduce(
        [
            "--datasets",
            "cub",
            "--seeds",
            "0",
            "--dry-run",
            "--results-dir",
            str(tmp_path / "results"),
            "--extra",
            f"paths.data_dir={tmp_path}",
        ]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "would run cub / cub_proxy_anchor_r50 / seed 0" in result.stdout
    assert "experiment=cub_multi_similarity_bninception" in result.stdout


def test_datasets_without_data_are_left_out(tmp_path):
    assert dataset_availability("synthetic") == (True, "built in")
    ok, reason = dataset_availability("cub", [f"paths.data_dir={tmp_path}"])
    assert not ok and "not found" in reason
    (tmp_path / "CUB_200_2011").mkdir()
    assert dataset_availability("cub", [f"paths.data_dir={tmp_path}"])[0]
    assert dataset_availability("no_such_dataset") == (False, "no conf/data/no_such_dataset.yaml")


def test_tiny_grid_end_to_end_with_skip_and_resume(tmp_path, data_dir):
    results = tmp_path / "results"
    extra = shlex.join([*TINY, f"paths.data_dir={data_dir}", "callbacks.visualization.prefixes=[test]"])
    args = ["--results-dir", str(results), "--extra", extra, "--datasets", "synthetic,cub"]

    first = run_reproduce([*args, "--losses", "triplet", "--seeds", "0"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "skipping dataset cub" in first.stdout
    finished = results / "runs" / "synthetic" / "triplet" / "seed0" / "metrics.json"
    assert finished.is_file()
    mtime = finished.stat().st_mtime_ns
    # A finished cell keeps the checkpoint it selected, not also the last.ckpt that only serves to continue it.
    selected = Path(json.loads(finished.read_text())["best_checkpoint"])
    assert sorted(p.name for p in (finished.parent / "checkpoints").iterdir()) == [selected.name] != ["last.ckpt"]

    # Two interrupted cells: seed 1 was killed after a checkpoint and continues from its last.ckpt (seed 0's
    # selected checkpoint stands in for it); seed 2 was killed before any checkpoint and starts over. The finished
    # cell is skipped.
    resumable = results / "runs" / "synthetic" / "triplet" / "seed1"
    (resumable / "checkpoints").mkdir(parents=True)
    shutil.copy(selected, resumable / "checkpoints" / "last.ckpt")
    fresh = results / "runs" / "synthetic" / "triplet" / "seed2"
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "checkpoints" / "stale.ckpt").write_bytes(b"partial")
    second = run_reproduce([*args, "--losses", "triplet", "--seeds", "0,1,2"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "skip   synthetic / triplet / seed 0" in second.stdout
    assert (
        "done   synthetic / triplet / seed 1" in second.stdout
        and "done   synthetic / triplet / seed 2" in second.stdout
    )
    assert finished.stat().st_mtime_ns == mtime
    log = (resumable / "reproduce.log").read_text()
    assert "resume=auto" in log and "Restoring states from the checkpoint" in (resumable / "train.log").read_text()
    assert not (fresh / "checkpoints" / "stale.ckpt").exists() and (fresh / "metrics.json").is_file()
    assert json.loads((fresh / "reproduce.json").read_text())["seconds"] > 0

    markdown = (results / "results.md").read_text()
    assert "### synthetic" in markdown and "| loss | seeds | R@1 | R@2 | R@4 | R@8 | MAP@R | R-Precision |" in markdown
    triplet_row = next(line for line in markdown.splitlines() if line.startswith("| triplet |"))
    assert triplet_row.startswith("| triplet | 3 |") and "±" in triplet_row
    assert "Training time of these runs" in markdown
    # The run ends with its table on the console, not only the file's name.
    assert "Reproduce: test classes" in second.stdout and "triplet" in second.stdout.split("Reproduce: test classes")[1]
    with open(results / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["loss"], r["num_seeds"]) for r in rows] == [("synthetic", "triplet", "3")]
    assert {"recall@1_mean", "recall@1_std", "map@r_mean", "r_precision_std"} <= set(rows[0])
    with open(results / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (results / "recall_at_1.png").stat().st_size > 1000
    # The cells draw the final test set only: the notebook finds a map and a retrieval table in every cell.
    assert (fresh / "tables" / "retrieval_test.csv").is_file()


def test_a_finished_cell_drops_last_ckpt_only_when_it_selected_another_checkpoint(tmp_path):
    def cell(name: str, best: str | None, files: tuple[str, ...]) -> Path:
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        for file in files:
            (folder / "checkpoints" / file).write_bytes(b"x")
        if best is not None:
            # Written where the run was trained: the results folder has moved since, so only the name matches.
            (folder / "metrics.json").write_text(json.dumps({"best_checkpoint": f"/elsewhere/checkpoints/{best}"}))
        return folder

    def left(folder: Path) -> list[str]:
        return sorted(p.name for p in (folder / "checkpoints").iterdir())

    selected = cell("selected", "epoch003.ckpt", ("epoch003.ckpt", "last.ckpt"))
    assert drop_resume_checkpoint(selected) and left(selected) == ["epoch003.ckpt"]
    for name, best, files in [
        ("selection_last", "last.ckpt", ("last.ckpt",)),  # selection=last: last.ckpt is the selected one
        ("unfinished", None, ("last.ckpt",)),  # no metrics.json: still resumable
        ("selected_missing", "epoch003.ckpt", ("last.ckpt",)),  # nothing else would be left
    ]:
        folder = cell(name, best, files)
        assert not drop_resume_checkpoint(folder) and left(folder) == ["last.ckpt"], name
