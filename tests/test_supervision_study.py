"""The supervision study's summary: per-run rows from the run folders, mean and t-interval per setting, plot."""

from __future__ import annotations

import csv
import json
import math

import pytest
from scipy import stats

from metricsearch.pipelines.supervision_study import summarize_study


def _write_run(folder, test: dict[str, float], untrained: dict[str, float] | None = None, mode: str = "val") -> None:
    folder.mkdir(parents=True)
    metrics = {"test": test} | ({"untrained": untrained} if untrained else {})
    (folder / "metrics.json").write_text(json.dumps({"selection": {"mode": mode}, "metrics": metrics}))


def test_summary_is_the_mean_and_t_interval_over_seeds_of_what_finished(tmp_path):
    runs = tmp_path / "out" / "runs"
    _write_run(runs / "class" / "seed0", {"recall@1": 0.20, "map@r": 0.05}, {"recall@1": 0.06, "map@r": 0.01})
    _write_run(runs / "class" / "seed1", {"recall@1": 0.30, "map@r": 0.07}, {"recall@1": 0.08, "map@r": 0.01})
    _write_run(runs / "none_simclr" / "seed0", {"recall@1": 0.10, "map@r": 0.02}, mode="last")
    _write_run(runs / "imagenet_frozen", {"recall@1": 0.5, "map@r": 0.2})
    (runs / "pairs_400" / "seed0").mkdir(parents=True)  # unfinished: no metrics.json

    summary = summarize_study(tmp_path / "out", tmp_path / "results")

    by_name = {entry["setting"]: entry for entry in summary}
    assert list(by_name) == ["class", "untrained", "none_simclr", "imagenet_frozen"]
    half = stats.t.ppf(0.975, 1) * math.sqrt(((20 - 25) ** 2 + (30 - 25) ** 2) / 1) / math.sqrt(2)
    assert by_name["class"]["recall@1"] == 25.0 and by_name["class"]["recall@1_half_interval"] == pytest.approx(
        half, abs=0.01
    )
    assert by_name["untrained"]["recall@1"] == 7.0 and by_name["untrained"]["runs"] == 2
    assert by_name["none_simclr"]["runs"] == 1 and by_name["none_simclr"]["recall@1_half_interval"] is None
    with open(tmp_path / "results" / "runs.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["setting"], r["seed"], r["selection"]) for r in rows][-1] == ("imagenet_frozen", "0", "-")
    table = (tmp_path / "results" / "summary.md").read_text()
    assert f"| `class` | 1,600 image labels (80 classes) | 2 | 25.00 ± {half:.2f} |" in table
    assert "| `none_simclr` | none | 1 | 10.00 | 2.00 |" in table
    assert (tmp_path / "results" / "supervision.png").stat().st_size > 10_000
