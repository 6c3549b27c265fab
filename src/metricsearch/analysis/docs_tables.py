"""The results tables of the documentation and README, generated from the committed files, never typed by hand.

Each table lives in a markdown page between two marker comments::

    <!-- generated: compare -->
    ...the table, written by scripts/docs_tables.py...
    <!-- end generated: compare -->

:func:`update_pages` rewrites what lies between the markers from the files under ``results/`` (and, for the recipe
table, the recipe cards of ``conf/experiment/``); :func:`stale_tables` lists the pages whose tables differ from what
would be generated, which the test suite checks, so a number in the docs is always the number in the results files.

Tables (name: source):

- ``compare``: the fair comparison, ``results/compare/{summary,trials,runs}.csv`` (``make compare``);
- ``reproduce``: the default-parameter table, ``results/results.csv`` and ``results/runs.csv`` (``make reproduce``);
- ``options``: warm-up, pooling and XBM on the built-in data, ``results/options/*/results.{csv,md}``;
- ``recipes``: the paper recipes, the ``recipe:`` cards of ``conf/experiment/*.yaml``;
- ``performance``: the speed targets, ``results/benchmark/benchmark.json`` and ``results/benchmark/avx2/``;
- ``supervision`` and ``supervision_cifar``: the supervision study, ``results/supervision/summary.md`` and
  ``results/supervision/cifar_standin/summary.md`` (``scripts/supervision_study.py``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metricsearch.analysis.compare import indistinguishable_from_best
from metricsearch.analysis.files import read_csv
from metricsearch.utils.atomic_io import atomic_write_text

__all__ = [
    "TABLES",
    "DocsSources",
    "format_backend_table",
    "generate_tables",
    "render_markers",
    "stale_tables",
    "update_pages",
]

MARKER = re.compile(
    r"(?P<open><!-- generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(?P<close><!-- end generated: (?P=name) -->)",
    re.DOTALL,
)


@dataclass(frozen=True)
class DocsSources:
    """Where the tables are read from: the results folder and the recipe cards' folder."""

    results_dir: Path
    experiment_dir: Path

    @classmethod
    def of_repository(cls, root: str | Path) -> DocsSources:
        root = Path(root)
        return cls(root / "results", root / "conf" / "experiment")


def _pct(value: float | str | None, digits: int = 1) -> str:
    if value in (None, ""):
        return ""
    value = float(value)
    return "" if math.isnan(value) else f"{100 * value:.{digits}f}"


def _pm(mean: str | float | None, spread: str | float | None) -> str:
    """``mean ± spread`` in percent (the mean alone without a spread)."""
    shown = _pct(mean)
    if not shown or spread in (None, "") or math.isnan(float(spread)):
        return shown
    return f"{shown} ± {_pct(spread)}"


def _table(header: Sequence[str], align: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


# --- the fair comparison (make compare) ---

COMPARE_METRIC = "recall@1"


def _format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key.removeprefix('loss.')} {_format_value(value)}" for key, value in sorted(params.items()))


def compare_table(sources: DocsSources, metric: str = COMPARE_METRIC) -> str:
    """The headline table of ``make compare``: per loss the search's best validation MAP@R and parameters, the
    tuned and default test ``metric`` (mean ± 95% half-width over the fold x seed models) and Welch's verdict."""
    folder = sources.results_dir / "compare"
    summary, trials, runs = (read_csv(folder / name) for name in ("summary.csv", "trials.csv", "runs.csv"))
    lines: list[str] = []
    for dataset in dict.fromkeys(row["dataset"] for row in summary):

        def interval(loss: str, kind: str, dataset: str = dataset) -> tuple[float, str]:
            for row in summary:
                if (row["dataset"], row["loss"], row["kind"], row["metric"]) == (dataset, loss, kind, metric):
                    return float(row["mean"]), _pm(row["mean"], (float(row["ci_high"]) - float(row["ci_low"])) / 2)
            return math.nan, ""

        losses = list(dict.fromkeys(row["loss"] for row in summary if row["dataset"] == dataset))
        tuned_runs = {
            loss: [
                float(row[metric])
                for row in runs
                if (row["dataset"], row["loss"], row["kind"]) == (dataset, loss, "tuned") and row["current"] == "True"
            ]
            for loss in losses
        }
        best = max(losses, key=lambda loss: interval(loss, "tuned")[0])
        same = indistinguishable_from_best({loss: v for loss, v in tuned_runs.items() if v})
        budget = [
            row
            for row in trials
            if row["dataset"] == dataset and row["state"] == "COMPLETE" and row["in_budget"] == "True"
        ]
        rows = []
        for loss in sorted(losses, key=lambda loss: -interval(loss, "tuned")[0]):
            searched = [row for row in budget if row["loss"] == loss]
            top = max(searched, key=lambda row: float(row["objective"])) if searched else None
            mark = "best" if loss == best else ("≈" if same.get(loss) else "")
            rows.append(
                [
                    loss,
                    _pct(top["objective"]) if top else "",
                    _format_params(json.loads(top["params"])) if top else "",
                    interval(loss, "tuned")[1],
                    interval(loss, "concatenated")[1],
                    interval(loss, "default")[1],
                    mark,
                ]
            )
        trial_counts = sorted({sum(row["loss"] == loss for row in budget) for loss in losses})
        finals = [row for row in runs if (row["dataset"], row["kind"], row["current"]) == (dataset, "tuned", "True")]
        folds = sorted({row["fold"] for row in finals})
        seeds = sorted({row["seed"] for row in finals})
        lines += [
            f"{dataset}: {len(losses)} losses x {'/'.join(map(str, trial_counts))} trials x {len(folds)} folds; "
            f"finals {len(folds)} folds x {len(seeds)} seeds; test {metric_label(metric)} %, mean ± 95% half-width "
            f"over the {len(folds) * len(seeds)} fold x seed models (`results/compare/compare.md`).",
            "",
            *_table(
                [
                    "loss",
                    "best val MAP@R (search)",
                    "best parameters found",
                    "tuned",
                    "tuned, concatenated",
                    "default params",
                    "vs best",
                ],
                ["---", "---:", "---", "---:", "---:", "---:", ":---:"],
                rows,
            ),
            "",
        ]
    return "\n".join(lines).rstrip()


def metric_label(metric: str) -> str:
    """``recall@1`` -> ``R@1``, ``map@r`` -> ``MAP@R``, ``r_precision`` -> ``R-Precision``."""
    if metric.startswith("recall@"):
        return "R@" + metric.split("@", 1)[1]
    return {"map@r": "MAP@R", "r_precision": "R-Precision", "nmi": "NMI", "precision@1": "P@1"}.get(metric, metric)


# --- the default-parameter table (make reproduce) and the options table ---

REPRODUCE_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision")


def _summary_rows(path: Path) -> list[dict[str, str]]:
    return read_csv(path)


def reproduce_table(sources: DocsSources) -> str:
    """``results/results.csv`` as a table (mean ± sample std over seeds, %), with the grid's training time."""
    rows = _summary_rows(sources.results_dir / "results.csv")
    lines: list[str] = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        body = [
            [row["loss"], row["num_seeds"]] + [_pm(row[f"{m}_mean"], row.get(f"{m}_std")) for m in REPRODUCE_METRICS]
            for row in rows
            if row["dataset"] == dataset
        ]
        if len(set(dict.fromkeys(row["dataset"] for row in rows))) > 1:
            lines += [f"**{dataset}**", ""]
        lines += _table(
            ["loss", "seeds", *(metric_label(m) for m in REPRODUCE_METRICS)],
            ["---", "---:", *(["---:"] * len(REPRODUCE_METRICS))],
            body,
        )
        lines.append("")
    runs = read_csv(sources.results_dir / "runs.csv")
    minutes = sum(float(row["seconds"]) for row in runs) / 60
    lines.append(
        f"Test classes, mean ± sample std over seeds, %; {len(runs)} runs, {minutes:.1f} minutes of training in all "
        "(`results/results.md`, `results/runs.csv`)."
    )
    return "\n".join(lines)


OPTIONS_METRICS = ("recall@1", "map@r", "r_precision")
_COMMAND = re.compile(r"^Command: `(?P<command>.*)`\s*$", re.MULTILINE)


def _extra_overrides(results_md: Path) -> str:
    """The ``--extra`` overrides of the command a ``results.md`` footer records ('' for none)."""
    match = _COMMAND.search(results_md.read_text(encoding="utf-8"))
    if not match:
        return ""
    extra = re.search(r"--extra (?P<value>'[^']*'|\S+)", match["command"])
    return extra["value"].strip("'") if extra else ""


def options_table(sources: DocsSources) -> str:
    """Each ``results/options/<name>/`` grid as rows: loss, the option's overrides, R@1, MAP@R, R-Precision."""
    body = []
    folders = sorted(p for p in (sources.results_dir / "options").iterdir() if (p / "results.csv").is_file())
    # The baseline (no extra overrides) first, then each option, grouped by loss.
    entries = []
    for folder in folders:
        extra = _extra_overrides(folder / "results.md")
        for row in _summary_rows(folder / "results.csv"):
            entries.append((row["loss"], extra, row))
    for loss, extra, row in sorted(entries, key=lambda e: (e[0], e[1] != "", e[1])):
        cells = [_pm(row[f"{m}_mean"], row.get(f"{m}_std")) for m in OPTIONS_METRICS]
        body.append([loss, f"`{extra}`" if extra else "none", *cells])
    seeds = sorted({row["num_seeds"] for _, _, row in entries})
    lines = _table(
        ["loss", "option", *(metric_label(m) for m in OPTIONS_METRICS)],
        ["---", "---", *(["---:"] * len(OPTIONS_METRICS))],
        body,
    )
    lines += ["", f"Test classes, mean ± std over {'/'.join(seeds)} seeds, % (`results/options/*/results.md`)."]
    return "\n".join(lines)


# --- the paper recipes (conf/experiment/ cards) ---


def _protocol(ours: str, paper: str) -> str:
    return ours if paper in ("", ours) else f"{ours} (the source: {paper})"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "/")


def recipes_table(sources: DocsSources) -> str:
    """One row per recipe card: the recipe, its title, the published R@1 with the row it comes from (or why none is
    printed), the protocol, the expected gap by reading, and the card's declared differences."""
    body, differences = [], []
    for path in sorted(sources.experiment_dir.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        card = raw.get("recipe")
        if not isinstance(card, dict):
            continue
        published = card.get("published") or {}
        row = _one_line(card.get("published_row") or "")
        if "recall@1" in published:
            shown = f"{float(published['recall@1']):.1f}"
        else:
            shown = "not verified" if row.startswith("not verified") else "none"
        body.append(
            [
                f"`{path.stem}`",
                _one_line(card.get("title", path.stem)),
                shown,
                row or "–",
                _protocol(str(raw.get("selection") or "val"), str(card.get("published_protocol") or "")),
                _one_line(card.get("expected_gap") or "–"),
            ]
        )
        listed = [_one_line(d) for d in card.get("differences") or []]
        differences += [f"    - `{path.stem}`: " + " ".join(listed)] if listed else []
    header = ["recipe", "paper setting", "published R@1", "its row", "protocol", "expected gap (by reading)"]
    lines = _table(header, ["---", "---", "---:", "---", "---", "---"], body)
    lines += ["", '??? note "What each card declares as different from the official code, and why"', "", *differences]
    return "\n".join(lines)


# --- the performance targets (make benchmark) ---


def _target_cell(target: Mapping[str, Any] | None) -> str:
    if target is None:
        return "—"
    if target.get("value") is None:
        return str(target.get("not_measured") or "not measured")
    return f"{float(target['value']):.3g}"


def _met(target: Mapping[str, Any] | None) -> str:
    if target is None or target.get("met") is None:
        return "not measured"
    return "yes" if target["met"] else "**no**"


def _ratio(evaluation: Mapping[str, Any], method: str) -> str:
    ours, pml = evaluation.get(method) or {}, evaluation.get("pml") or {}
    if not ours.get("seconds") or not pml.get("seconds"):
        return "—"
    return f"{pml['seconds'] / ours['seconds']:.3g} ({pml['seconds']:.1f} s vs {ours['seconds']:.1f} s)"


def _machine(report: Mapping[str, Any]) -> str:
    machine = report.get("machine", {})
    text = f"{machine.get('cpu', 'CPU')}, {machine.get('cpu_cores', '?')} cores"
    if machine.get("isa_limits"):
        text += ", dispatch limited to AVX2"
    return text


def performance_table(sources: DocsSources) -> str:
    """The benchmark's targets: the committed report's values beside those of the AVX2-limited report."""
    folder = sources.results_dir / "benchmark"
    reports = [json.loads((folder / "benchmark.json").read_text(encoding="utf-8"))]
    if (folder / "avx2" / "benchmark.json").is_file():
        reports.append(json.loads((folder / "avx2" / "benchmark.json").read_text(encoding="utf-8")))
    header = ["target", "threshold", *(_machine(r) for r in reports), "met (first machine)"]
    body = []
    for target in reports[0]["targets"]:
        found = [next((t for t in r["targets"] if t["target"] == target["target"]), None) for r in reports]
        body.append([target["description"], target["threshold"], *(_target_cell(t) for t in found), _met(target)])
    body.append(
        [
            "SOP-size evaluation with the float32 screen (a CPU without fast int8 or bfloat16 products): "
            "AccuracyCalculator time / ours",
            ">= 2",
            *(_ratio(r.get("evaluation", {}), "ours_float32") for r in reports),
            "",
        ]
    )
    lines = _table(header, ["---", "---", *(["---"] * len(reports)), "---"], body)
    nmi = next((r["evaluation"]["nmi"] for r in reports if (r.get("evaluation") or {}).get("nmi")), None)
    if nmi and nmi.get("cpu_one_iteration"):
        seconds = nmi["cpu_one_iteration"]["seconds"]
        schedule = nmi["full_schedule"]
        lines += [
            "",
            f"NMI at SOP size: one faiss k-means iteration ({nmi['macs_per_iteration']:.1e} multiply-adds) took "
            f"{seconds:.1f} s, so the customary {schedule['niter']} iterations x {schedule['nredo']} runs would take "
            f"~{nmi['cpu_full_schedule_seconds_estimate'] / 60:.0f} minutes per evaluation on these two cores.",
        ]
    lines += ["", "Reports: `results/benchmark/benchmark.md`, `results/benchmark/avx2/benchmark.md`."]
    return "\n".join(lines)


def postprocess_table(sources: DocsSources) -> str:
    """Re-ranking and query expansion: each method's R@1 and MAP@R, their change from none, and its time."""
    report = json.loads((sources.results_dir / "postprocess" / "postprocess.json").read_text(encoding="utf-8"))
    body = [
        [
            row["setting"],
            row["method"],
            f"{row['recall@1']:.2f}",
            f"{row['recall@1 change']:+.2f}",
            f"{row['map@r']:.2f}",
            f"{row['map@r change']:+.2f}",
            f"{row['seconds']:.1f}",
        ]
        for row in report["rows"]
    ]
    header = ["setting", "postprocess", "R@1 %", "change", "MAP@R %", "change", "seconds"]
    lines = _table(header, ["---", "---", "---:", "---:", "---:", "---:", "---:"], body)
    lines += ["", f"Measured on {_machine(report)} with `{report['command']}` (`results/postprocess/`)."]
    return "\n".join(lines)


def _study_summary(sources: DocsSources, folder: str, command: str, picture: str | None = None) -> str:
    """The summary a study wrote into ``results/FOLDER``, or a line saying none has; and its plot (``picture`` is
    the link text), when there is one to link."""
    file = sources.results_dir / folder / "summary.md"
    if not file.is_file():
        return f"No run of this study has finished yet: `{command}` writes `results/{folder}/summary.md`."
    text = file.read_text(encoding="utf-8").strip()
    if picture is not None and (sources.results_dir / folder / "supervision.png").is_file():
        # Pages link results pictures relative to the docs folder (docs/hooks/results_files.py).
        text += f"\n\n![{picture}](results/{folder}/supervision.png)"
    return text


def supervision_table(sources: DocsSources) -> str:
    """The supervision study on the built-in data (``scripts/supervision_study.py``): its summary table and the
    line stating its optimizer steps, as the study wrote them."""
    return _study_summary(sources, "supervision", "nice -n 10 python scripts/supervision_study.py")


def supervision_cifar_table(sources: DocsSources) -> str:
    """The supervision study on the CIFAR-10 stand-in (``scripts/supervision_study.py dataset=cifar_standin``), and
    its plot once there is one."""
    return _study_summary(
        sources,
        "supervision/cifar_standin",
        "nice -n 10 python scripts/supervision_study.py dataset=cifar_standin",
        picture="test R@1 and MAP@R of each supervision setting on the CIFAR-10 stand-in",
    )


def _index_params(params: Mapping[str, Any]) -> str:
    """An index's parameters of a benchmark row (its ``kind`` left out), e.g. ``nlist 1024, nprobe 16``."""
    return ", ".join(f"{key} {value}" for key, value in params.items() if key != "kind")


def format_backend_table(result: Mapping[str, Any]) -> str:
    """A markdown table of ``benchmarks.search_backends.run_backend_benchmark``'s rows (``make bench-search``)."""
    s, k = result["settings"], result["settings"]["k"]
    lines = [
        f"gallery {s['n']:,} x {s['dim']} (clustered: {s['clusters']} centres), {s['queries']} queries, k={k}, "
        f"{result['cpus']} CPUs",
        "",
        f"| backend | index | build s | add 1k s | QPS 1 client | QPS 16 clients | recall@{k} | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['backend']} | {row['kind']} | error: {row['error'][:80]} | | | | | |")
            continue
        params = _index_params(row["params"])
        index = row["kind"] + (f" ({params})" if params else "")
        qps = {int(clients): value for clients, value in row["qps"].items()}  # JSON keys are strings
        lines.append(
            f"| {'Milvus Lite' if row['backend'] == 'milvus' else 'faiss'} | {index} | {row['build_s']:.2f} | "
            f"{row['add_1k_s']:.3f} | {qps[1]:,.0f} | {qps[16]:,.0f} | {row[f'recall@{k}']:.4f} | "
            f"{row['peak_mib']:,.0f} |"
        )
    return "\n".join(lines)


def search_backends_table(sources: DocsSources) -> str:
    """``make bench-search``'s backend comparison at each committed gallery size (100k, then 1M vectors)."""
    blocks = []
    for name in ("search_backends_100k.json", "search_backends_1m.json"):
        report = json.loads((sources.results_dir / "benchmark" / name).read_text(encoding="utf-8"))
        footer = f"Measured on {_machine(report)} with `{report['command']}` (`results/benchmark/{name}`)."
        blocks.append(format_backend_table(report["backends"]) + "\n\n" + footer)
    return "\n\n".join(blocks)


def search_latency_table(sources: DocsSources) -> str:
    """``make bench-search``'s faiss section: each index kind's build time, single-query latency, batched
    throughput and recall against exact search, and the model's embedding rate when the run had one."""
    report = json.loads((sources.results_dir / "benchmark" / "search_latency.json").read_text(encoding="utf-8"))
    s, k = report["settings"], report["settings"]["k"]
    body = []
    for row in report["indexes"]:
        params = _index_params(row["params"])
        body.append(
            [
                row["index"] + (f" ({params})" if params else " (exact)"),
                f"{row['build_s']:.2f}",
                f"{row['query_p50_ms']:.3f}",
                f"{row['query_p99_ms']:.3f}",
                f"{row['batch_queries_per_s']:,.0f}",
                f"{row[f'recall@{k}']:.4f}",
            ]
        )
    header = ["index", "build s", "p50 ms", "p99 ms", "batched queries/s", f"recall@{k} vs exact"]
    lines = _table(header, ["---", "---:", "---:", "---:", "---:", "---:"], body)
    lines += ["", f"Gallery {s['n']:,} x {s['dim']} around {s['clusters']:,} centres, {s['queries']:,} queries, k={k}."]
    if "embedding" in report:
        lines[-1] += (
            f" The model embedded gallery images at {report['embedding']['images_per_s']:,.0f} images/s, so embedding,"
            " not indexing, bounds how fast an index of images is built."
        )
    source = "`results/benchmark/search_latency.json`"
    lines += ["", f"Measured on {_machine(report)} with `{report['command']}` ({source})."]
    return "\n".join(lines)


LOAD_TEST_FILES = ("load_test_faiss.json", "load_test_milvus.json")


def format_load_test_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """One row per query kind of a ``scripts/load_test.py out=`` report, then one for all its requests."""
    index = report["index"]
    backend = "Milvus Lite" if index.get("backend") == "milvus" else "faiss"
    name = f"{backend} ({index['index_kind']}, {index['count']:,} images)"
    kinds = {"path": "gallery path (search only)", "upload": "upload (decode, embed, search)"}

    def row(label: str, part: Mapping[str, Any]) -> list[str]:
        latency = part["latency_ms"]
        cells = [f"{latency[key]:.1f}" if latency[key] is not None else "-" for key in ("p50", "p90", "p99")]
        return [name, label, f"{part['requests']:,}", f"{part['errors']:,}", f"{part['throughput_rps']:.1f}", *cells]

    rows = [row(kinds.get(kind, kind), part) for kind, part in report["by_kind"].items()]
    return [*rows, row("all", report)]


def load_test_table(sources: DocsSources) -> str:
    """``make load-test`` against the demo index on each backend: requests, failures and latency per query kind."""
    reports = [
        (name, json.loads((sources.results_dir / "benchmark" / name).read_text(encoding="utf-8")))
        for name in LOAD_TEST_FILES
    ]
    header = ["backend", "queries", "requests", "non-2xx or wrong", "req/s", "p50 ms", "p90 ms", "p99 ms"]
    body = [row for _, report in reports for row in format_load_test_rows(report)]
    lines = _table(header, ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:"], body)
    lines.append("")
    for name, report in reports:
        load = report["machine"].get("load_average_at_start") or [None]
        lines.append(
            f"- `results/benchmark/{name}`: {report['clients']} clients x {report['duration_s']:g} s, "
            f"`{report['command']}` on {_machine(report)}"
            + (f", load average {load[0]:.1f} at the start" if load[0] is not None else "")
            + "."
        )
    return "\n".join(lines)


TABLES: dict[str, Callable[[DocsSources], str]] = {
    "compare": compare_table,
    "reproduce": reproduce_table,
    "options": options_table,
    "recipes": recipes_table,
    "performance": performance_table,
    "postprocess": postprocess_table,
    "supervision": supervision_table,
    "supervision_cifar": supervision_cifar_table,
    "search_backends": search_backends_table,
    "search_latency": search_latency_table,
    "load_test": load_test_table,
}


def generate_tables(sources: DocsSources, names: Iterable[str] | None = None) -> dict[str, str]:
    """The markdown of each named table (all of :data:`TABLES` by default)."""
    return {name: TABLES[name](sources) for name in (names or TABLES)}


def render_markers(text: str, tables: Mapping[str, str]) -> str:
    """``text`` with the body between each pair of markers replaced by that table.

    Raises:
        KeyError: a marker names a table that does not exist.
    """

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in tables:
            raise KeyError(f"unknown generated table {name!r}; known: {', '.join(sorted(tables))}")
        return f"{match['open']}{tables[name].rstrip()}\n{match['close']}"

    return MARKER.sub(replace, text)


def marker_names(text: str) -> list[str]:
    """The tables a page holds, in order."""
    return [match["name"] for match in MARKER.finditer(text)]


def stale_tables(pages: Iterable[Path], sources: DocsSources) -> list[str]:
    """``page: table`` for every generated table whose committed text differs from what would be generated."""
    tables = generate_tables(sources)
    stale = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in MARKER.finditer(text):
            if match["body"].rstrip() != tables[match["name"]].rstrip():
                stale.append(f"{page}: {match['name']}")
    return stale


def update_pages(pages: Iterable[Path], sources: DocsSources) -> list[Path]:
    """Rewrites the generated tables of ``pages``; returns the pages that changed."""
    tables = generate_tables(sources)
    changed = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        new = render_markers(text, tables)
        if new != text:
            atomic_write_text(page, new)
            changed.append(page)
    return changed
