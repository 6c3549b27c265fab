"""The comparison's results: intervals per loss, ``compare.md``, ``trials.csv``, ``runs.csv``, ``summary.csv`` and
the plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from metricsearch.analysis.files import save_figure, write_csv
from metricsearch.analysis.results import metric_title, recall_keys
from metricsearch.analysis.run_folder import CONFIG_FILE, TEST_EMBEDDINGS_FILE, read_config
from metricsearch.pipelines.compare.finals import FinalResult, collect_final_results
from metricsearch.pipelines.compare.folds import DEFAULT, SEARCH, TUNED
from metricsearch.pipelines.compare.space import Protocol, params_key
from metricsearch.pipelines.compare.study import best_trial, budget_trials
from metricsearch.utils.atomic_io import atomic_write_text

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

# The metrics of the tables, one table each; the CSVs hold every metric the runs logged.
TABLE_METRICS = ("recall@1", "map@r", "r_precision")


@dataclass
class Interval:
    """Mean and 95% confidence interval of ``n`` values (low and high NaN when ``n`` < 2)."""

    mean: float
    low: float
    high: float
    n: int

    def cell(self) -> str:
        """``mean ± half-width`` in percent (the mean alone without an interval)."""
        if self.n == 0 or math.isnan(self.mean):
            return ""
        if self.n < 2 or math.isnan(self.low):
            return f"{100 * self.mean:.1f}"
        return f"{100 * self.mean:.1f} ± {100 * (self.high - self.low) / 2:.1f}"


def interval(values: Sequence[float]) -> Interval:
    """The mean and 95% t-interval of ``values`` (:func:`metricsearch.analysis.compare.mean_ci`)."""
    from metricsearch.analysis.compare import mean_ci

    values = [float(v) for v in values]
    if not values:
        return Interval(math.nan, math.nan, math.nan, 0)
    if len(values) == 1:
        return Interval(values[0], math.nan, math.nan, 1)
    mean, low, high = mean_ci(values)
    return Interval(float(mean), float(low), float(high), len(values))


@dataclass
class LossSummary:
    """One loss of one dataset: its search, its best setting and the intervals of its final runs per metric."""

    dataset: str
    loss: str
    budget: int
    trial_counts: dict[str, int]
    best_value: float | None
    best_params: dict[str, Any]
    best_key: str | None
    tuned: dict[str, Interval] = field(default_factory=dict)
    concatenated: dict[str, Interval] = field(default_factory=dict)
    default: dict[str, Interval] = field(default_factory=dict)
    tuned_values: dict[str, list[float]] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)


def format_params(params: Mapping[str, Any]) -> str:
    """``loss.margin=0.1`` -> ``margin 0.1``: the searched parameters, short, in a table cell.

    Example:
        >>> format_params({"loss.margin": 0.123456, "miner.epsilon": 0.5})
        'margin 0.123, miner.epsilon 0.5'
    """
    parts = []
    for key, value in params.items():
        name = key.removeprefix("loss.")
        parts.append(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts)


def indistinguishable_marks(summaries: Sequence[LossSummary], metric: str) -> dict[str, str]:
    """``best`` for the loss of highest tuned mean, ``≈`` for those Welch's test cannot tell from it (p ≥ 0.05)."""
    from metricsearch.analysis.compare import indistinguishable_from_best

    samples = {s.loss: s.tuned_values.get(metric, []) for s in summaries if s.tuned_values.get(metric)}
    if not samples:
        return {}
    best = max(samples, key=lambda loss: (float(np.mean(samples[loss])), loss))
    same = indistinguishable_from_best(samples) if len(samples) > 1 else {best: True}
    return {loss: "best" if loss == best else ("≈" if same.get(loss) else "") for loss in samples}


def format_compare_markdown(summaries: Sequence[LossSummary], protocol_line: str = "", footer: str = "") -> str:
    """Per dataset: the search (trials, best validation score, best parameters) and one table per metric."""
    lines = ["## Fair comparison: equal tuning budget per loss, class-disjoint cross-validation, 95% CIs", ""]
    if protocol_line:
        lines += [protocol_line, ""]
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        rows = [s for s in summaries if s.dataset == dataset]
        lines += [
            f"### {dataset}",
            "",
            "| loss | trials | best val MAP@R | best parameters | final runs |",
            "|---|---:|---:|---|---|",
        ]
        for s in rows:
            counts = ", ".join(f"{n} {state.lower()}" for state, n in s.trial_counts.items() if n)
            best = "" if s.best_value is None else f"{100 * s.best_value:.1f}"
            lines.append(
                f"| {s.loss} | {s.budget} ({counts}) | {best} | {format_params(s.best_params)} | "
                f"{s.folders.get(TUNED, '')} |"
            )
        lines.append("")
        for metric in TABLE_METRICS:
            if not any(metric in s.tuned or metric in s.default for s in rows):
                continue
            marks = indistinguishable_marks(rows, metric)
            ordered = sorted(rows, key=lambda s: -(s.tuned[metric].mean if metric in s.tuned else -1.0))
            lines += [
                f"#### {metric_title(metric)} (test, %)",
                "",
                "| loss | tuned, separate | tuned, concatenated | default params, separate | vs best |",
                "|---|---:|---:|---:|:---:|",
            ]
            for s in ordered:
                cells = [
                    s.tuned.get(metric, Interval(math.nan, math.nan, math.nan, 0)).cell(),
                    s.concatenated.get(metric, Interval(math.nan, math.nan, math.nan, 0)).cell(),
                    s.default.get(metric, Interval(math.nan, math.nan, math.nan, 0)).cell(),
                    marks.get(s.loss, ""),
                ]
                lines.append(f"| {s.loss} | " + " | ".join(cells) + " |")
            lines.append("")
    if footer:
        lines += [footer.rstrip(), ""]
    return "\n".join(lines)


def _recall_at_k(folder: Path) -> list[int]:
    try:
        config = read_config(folder)
        return [int(k) for k in config["data"]["recall_at_k"]]
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return [1, 2, 4, 8]


def summarize_loss(
    dataset: str,
    loss: str,
    trials: Sequence[optuna.trial.FrozenTrial],
    budget: int,
    finals: Sequence[FinalResult],
    results_dir: Path,
) -> LossSummary:
    """Intervals of one loss's final runs: separate (every fold model of every seed), concatenated (per seed, the
    fold models' test embeddings side by side) and default-parameter separate."""
    from metricsearch.analysis.compare import concatenated_metrics

    counts = {state: 0 for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    best = best_trial(trials, budget)
    key = best.user_attrs.get("key") if best is not None else None
    summary = LossSummary(
        dataset,
        loss,
        budget,
        counts,
        best.value if best is not None else None,
        dict(best.params) if best is not None else {},
        key,
    )
    tuned = [r for r in finals if r.kind == TUNED and r.key == key]
    default = [r for r in finals if r.kind == DEFAULT]
    base = Path(dataset) / loss / "final"
    if key:
        summary.folders[TUNED] = str(base / f"{TUNED}-{key}")
    summary.folders[DEFAULT] = str(base / DEFAULT)
    names = recall_keys([m for r in tuned + default for m in r.metrics]) + ["map@r", "r_precision"]
    for name in names:
        values = [r.metrics[name] for r in tuned if name in r.metrics]
        if values:
            summary.tuned_values[name] = values
            summary.tuned[name] = interval(values)
        default_values = [r.metrics[name] for r in default if name in r.metrics]
        if default_values:
            summary.default[name] = interval(default_values)
    per_seed: dict[int, list[FinalResult]] = {}
    for r in tuned:
        per_seed.setdefault(r.seed, []).append(r)
    concatenated: list[dict[str, float]] = []
    for _seed, runs in sorted(per_seed.items()):
        runs = sorted(runs, key=lambda r: r.fold)
        if [r.fold for r in runs] != list(range(len(runs))) or len(runs) < 2:
            continue
        paths = [r.folder / TEST_EMBEDDINGS_FILE for r in runs]
        concatenated.append(concatenated_metrics(paths, _recall_at_k(runs[0].folder)))
    for name in names:
        values = [m[name] for m in concatenated if name in m]
        if values:
            summary.concatenated[name] = interval(values)
    return summary


def trial_rows(
    dataset: str, loss: str, trials: Sequence[optuna.trial.FrozenTrial], budget: int, folds: int
) -> list[dict]:
    """One CSV row per trial: its parameters, fold values, objective, state and whether it counts in the budget."""
    counted = {t.number for t in budget_trials(trials, budget)}
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        # A trial killed between drawing its parameters and recording their key still names its folder: the key is
        # a function of the parameters.
        key = t.user_attrs.get("key") or (params_key(t.params) if t.params else "")
        row: dict[str, Any] = {
            "dataset": dataset,
            "loss": loss,
            "trial": t.number,
            "state": t.state.name,
            "in_budget": t.number in counted,
            "objective": "" if t.value is None else round(t.value, 6),
            "retry_of": t.system_attrs.get("failed_trial", ""),
            "params": json.dumps(t.params, sort_keys=True),
            "key": key,
            "folder": str(Path(dataset) / loss / SEARCH / key) if key else "",
        }
        for fold in range(folds):
            value = t.user_attrs.get(f"fold{fold}")
            row[f"fold{fold}"] = "" if value is None else round(value, 6)
        row.update({f"param:{k}": v for k, v in t.params.items()})
        rows.append(row)
    return rows


def plot_intervals(summaries: Sequence[LossSummary], title: str = "") -> Figure:
    """Per metric, each loss's tuned and default test mean with its 95% CI (horizontal error bars)."""
    from matplotlib.figure import Figure

    metrics = [m for m in TABLE_METRICS if any(m in s.tuned or m in s.default for s in summaries)]
    fig = Figure(figsize=(4.2 * max(1, len(metrics)), 0.45 * len(summaries) + 1.8), dpi=100)
    y = np.arange(len(summaries))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for offset, (label, attr, marker) in enumerate((("tuned", "tuned", "o"), ("default params", "default", "s"))):
            means, errors = [], [[], []]
            for s in summaries:
                iv = getattr(s, attr).get(metric, Interval(math.nan, math.nan, math.nan, 0))
                means.append(100 * iv.mean)
                has_ci = iv.n > 1 and not math.isnan(iv.low)
                errors[0].append(100 * (iv.mean - iv.low) if has_ci else 0.0)
                errors[1].append(100 * (iv.high - iv.mean) if has_ci else 0.0)
            ax.errorbar(means, y + 0.15 - 0.3 * offset, xerr=errors, fmt=marker, capsize=3, label=label)
        ax.set_yticks(y, [s.loss for s in summaries] if i == 0 else [""] * len(summaries))
        ax.set_xlabel(f"test {metric_title(metric)} (%)")
        ax.grid(axis="x", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title or "mean and 95% CI over the fold x seed models", fontsize=10)
    fig.tight_layout()
    return fig


def plot_search_history(trials: Sequence[optuna.trial.FrozenTrial], budget: int, title: str = "") -> Figure:
    """Each trial's objective (pruned trials: their first fold) and the running best, against the trial number."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    counted = budget_trials(trials, budget)
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.add_subplot()
    complete = [t for t in counted if t.state.name == "COMPLETE"]
    pruned = [t for t in counted if t.state.name == "PRUNED"]
    ax.plot([t.number for t in complete], [100 * t.value for t in complete], "o", label="trial (mean over folds)")
    if pruned:
        ax.plot(
            [t.number for t in pruned],
            [100 * t.user_attrs.get("fold0", math.nan) for t in pruned],
            "x",
            label="pruned (first fold)",
        )
    best, xs, ys = -math.inf, [], []
    for t in complete:
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(100 * best)
    ax.step(xs, ys, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation MAP@R (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _study_folds(study: optuna.Study, default: int) -> int:
    """The number of folds a study's trials were trained on (from its fingerprint)."""
    for override in study.user_attrs.get("fingerprint", {}).get("overrides", []):
        if override.startswith("data.num_folds="):
            return int(override.split("=", 1)[1])
    return default


def write_compare_results(
    results_dir: Path, storage: optuna.storages.BaseStorage | None, protocol: Protocol, command: str = ""
) -> list[LossSummary]:
    """Summarizes every study of ``storage`` and the final runs under ``results_dir`` into the tables, CSVs and
    plots."""
    import optuna

    finals = collect_final_results(results_dir)
    summaries: list[LossSummary] = []
    all_trials: list[dict] = []
    studies = optuna.get_all_study_summaries(storage) if storage is not None else []
    histories: dict[tuple[str, str], tuple[list, int]] = {}
    for entry in sorted(studies, key=lambda s: s.study_name):
        dataset, _, loss = entry.study_name.partition("/")
        study = optuna.load_study(study_name=entry.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        budget = int(study.user_attrs.get("budget", protocol.trials))
        folds = _study_folds(study, protocol.folds)
        all_trials += trial_rows(dataset, loss, trials, budget, folds)
        summaries.append(
            summarize_loss(
                dataset,
                loss,
                trials,
                budget,
                [r for r in finals if (r.dataset, r.loss) == (dataset, loss)],
                results_dir,
            )
        )
        histories[(dataset, loss)] = (trials, budget)
    trial_columns = list(dict.fromkeys(k for row in all_trials for k in row))
    write_csv(results_dir / "trials.csv", all_trials, trial_columns)
    best_keys = {(s.dataset, s.loss): s.best_key for s in summaries}
    run_rows = []
    for r in finals:
        run_rows.append(
            {
                "dataset": r.dataset,
                "loss": r.loss,
                "kind": r.kind,
                "key": r.key,
                "current": r.kind == DEFAULT or best_keys.get((r.dataset, r.loss)) == r.key,
                "seed": r.seed,
                "fold": r.fold,
                **{k: round(v, 6) for k, v in r.metrics.items()},
                "folder": str(r.folder.relative_to(results_dir)),
                "config": str((r.folder / CONFIG_FILE).relative_to(results_dir)),
            }
        )
    write_csv(results_dir / "runs.csv", run_rows, list(dict.fromkeys(k for row in run_rows for k in row)))
    summary_rows = []
    for s in summaries:
        for kind, table in ((TUNED, s.tuned), ("concatenated", s.concatenated), (DEFAULT, s.default)):
            for metric, iv in table.items():
                summary_rows.append(
                    {
                        "dataset": s.dataset,
                        "loss": s.loss,
                        "kind": kind,
                        "metric": metric,
                        "mean": round(iv.mean, 6),
                        "ci_low": "" if math.isnan(iv.low) else round(iv.low, 6),
                        "ci_high": "" if math.isnan(iv.high) else round(iv.high, 6),
                        "n": iv.n,
                        "folder": s.folders.get(DEFAULT if kind == DEFAULT else TUNED, ""),
                    }
                )
    write_csv(results_dir / "summary.csv", summary_rows, list(dict.fromkeys(k for row in summary_rows for k in row)))
    protocol_line = (
        f"Per loss: {protocol.trials} Optuna TPE trials of its own parameters (conf/compare/<loss>.yaml"
        f"{'; the first at its default setting' if protocol.include_default else ''}), each "
        f"trained on {protocol.folds} class-disjoint folds of the training classes and scored by the mean "
        f"validation {protocol.monitor.split('/', 1)[1].upper()} over folds; the test classes are never evaluated "
        f"during the search. The best setting and the default one are then trained {protocol.folds} folds x "
        f"{len(protocol.seeds)} seed(s) and tested once. Separate: mean ± half-width of the 95% t-interval over "
        "the fold x seed models; concatenated: the fold models' embeddings side by side, interval over seeds; "
        "vs best: `≈` when Welch's t-test over the separate values cannot tell the loss from the best (p ≥ 0.05)."
    )
    footer = f"Command: `{command}`" if command else ""
    atomic_write_text(results_dir / "compare.md", format_compare_markdown(summaries, protocol_line, footer))
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        rows = [s for s in summaries if s.dataset == dataset and (s.tuned or s.default)]
        if rows:
            save_figure(
                plot_intervals(rows, f"{dataset}: test mean and 95% CI"), results_dir / dataset / "intervals.png"
            )
    for (dataset, loss), (trials, budget) in histories.items():
        if any(t.state.name == "COMPLETE" for t in trials):
            figure = plot_search_history(trials, budget, f"{dataset} / {loss}: search")
            save_figure(figure, results_dir / dataset / loss / "search_history.png")
    return summaries
