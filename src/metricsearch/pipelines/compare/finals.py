"""Final runs: the tuned and the default setting of a loss trained K folds x S seeds and tested once, and the
test metrics of those that finished."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metricsearch.analysis.run_folder import read_metrics
from metricsearch.pipelines.compare.folds import DEFAULT, TUNED, FoldRun, final_finished
from metricsearch.pipelines.compare.space import Protocol


def final_runs(dataset: str, loss: str, key: str | None, protocol: Protocol) -> list[FoldRun]:
    """The final runs of a loss: its tuned setting (``key``; none before any trial finished) and its default, each
    K folds x S seeds."""
    runs = []
    for kind, setting in ((TUNED, key), (DEFAULT, "")):
        if kind == TUNED and key is None:
            continue
        runs += [
            FoldRun(dataset, loss, kind, fold, seed, setting)
            for seed in protocol.seeds
            for fold in range(protocol.folds)
        ]
    return runs


@dataclass
class FinalResult:
    """The test metrics of one finished final run."""

    dataset: str
    loss: str
    kind: str
    key: str
    seed: int
    fold: int
    folder: Path
    metrics: dict[str, float]


def collect_final_results(results_dir: Path) -> list[FinalResult]:
    """Every finished final run under ``results_dir`` (``<dataset>/<loss>/final/<setting>/seed<s>/fold<k>``)."""
    found = []
    for folder in sorted(Path(results_dir).glob("*/*/final/*/seed*/fold*")):
        if not final_finished(folder):
            continue
        setting, seed, fold = folder.parent.parent.name, folder.parent.name, folder.name
        kind, _, key = setting.partition("-")
        summary = read_metrics(folder)
        metrics = {k: float(v) for k, v in summary["metrics"]["test"].items()}
        dataset, loss = folder.parents[4].name, folder.parents[3].name
        found.append(FinalResult(dataset, loss, kind, key, int(seed[4:]), int(fold[4:]), folder, metrics))
    return found
