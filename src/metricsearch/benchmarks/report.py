"""The speed benchmark's report: ``benchmark.json`` (every number) and ``benchmark.md`` (the summary).

:func:`render_markdown` puts the sections together; each ``render_*`` function writes one section of the report
dict that :func:`~metricsearch.benchmarks.speed.run_speed_benchmark` returns, and nothing when the section was not
run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from metricsearch.utils.atomic_io import atomic_write_text

EVAL_HEADER = "| method | time (s) | peak RSS (GB) | above baseline (GB) | Recall@1 | Recall@1000 | R-Prec. | MAP@R |"
EVAL_RULE = "|---|---|---|---|---|---|---|---|"
# The evaluation table's rows, in order: the key of the method's result and its name in the table.
EVAL_ROWS = (
    ("ours", "ours (CPU, default: {screen} screen)"),
    ("ours_bfloat16", "ours (CPU, bfloat16 screen)"),
    ("ours_int8", "ours (CPU, int8 screen)"),
    ("ours_float32", "ours (CPU, float32 screen)"),
    ("ours_cuda", "ours (GPU)"),
    ("pml", "pml AccuracyCalculator"),
)


def write_speed_report(report: dict[str, Any], out_dir: Path) -> None:
    """``benchmark.json`` and ``benchmark.md``, each written atomically."""
    atomic_write_text(out_dir / "benchmark.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    atomic_write_text(out_dir / "benchmark.md", render_markdown(report))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable summary of a report."""
    lines = render_machine(report) + render_targets(report["targets"])
    lines += render_evaluation(report.get("evaluation"))
    lines += render_query_gallery(report.get("query_gallery"))
    lines += render_lightning_overhead(report.get("lightning_overhead"))
    lines += render_training(report.get("training"))
    lines += render_gpu_evaluation(report.get("gpu_evaluation"))
    return "\n".join(lines) + "\n"


def render_machine(report: dict[str, Any]) -> list[str]:
    """The title and what the numbers came from: CPU, its features and limits, GPU, load, duration."""
    machine = report["machine"]
    return [
        "# MetricSearch benchmark",
        "",
        f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores, {machine['memory_gb']} GB"
        + (f" ({', '.join(machine['cpu_features'])})" if machine.get("cpu_features") else "")
        + (f", limited by {_isa_limits(machine['isa_limits'])}" if machine.get("isa_limits") else "")
        + (f", GPU {machine['cuda']}" if machine.get("cuda") else ", no GPU")
        + f"; torch {machine['torch']}. Load average at start {_load(machine.get('load_average_at_start'))}, "
        f"at end {_load(machine.get('load_average_at_end'))}. Total {report['seconds'] / 60:.1f} min"
        + (" (--quick)" if report.get("quick") else "")
        + ".",
    ]


def render_targets(targets: list[dict[str, Any]]) -> list[str]:
    """One row per target: threshold, measured value, and whether it was met (or why it was not measured)."""
    lines = ["", "## Targets", "", "| target | threshold | measured | met |", "|---|---|---|---|"]
    for target in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        measured = _fmt(target["value"], 3) if target["value"] is not None else target["not_measured"]
        if target.get("note"):
            met = target["note"]
        lines.append(f"| {target['description']} | {target['threshold']} | {measured} | {met} |")
    return lines


def render_evaluation(evaluation: dict[str, Any] | None) -> list[str]:
    """Ours (each screen, the GPU) vs AccuracyCalculator at full size, NMI's cost, torchmetrics on a subset."""
    if not evaluation:
        return []
    data = evaluation["data"]
    lines = [
        "",
        f"## Evaluation: {data['num_items']:,} x {data['dim']} embeddings, {data['num_classes']:,} classes",
        "",
        "Synthetic SOP-like embeddings (seeded); each method in its own process; peak RSS includes the ~0.9 GB "
        "of imported libraries and the embeddings, equal for all.",
        "",
        EVAL_HEADER,
        EVAL_RULE,
    ]
    screen = evaluation.get("ours", {}).get("screen", "auto")
    for key, name in EVAL_ROWS:
        if key in evaluation:
            lines.append(_eval_row(name.format(screen=screen), evaluation[key]))
    if "speedup_vs_pml" in evaluation:
        diffs = evaluation["max_abs_diff_vs_pml"]
        lines += [
            "",
            f"Speed-up over AccuracyCalculator: **{evaluation['speedup_vs_pml']:.2f}x**; peak RSS ratio "
            f"**{evaluation['memory_ratio_vs_pml']:.3f}** (above baseline: "
            f"{evaluation['memory_above_baseline_ratio_vs_pml']:.3f}). Largest value difference: "
            f"{max(diffs.values()):.2e} ({', '.join(diffs)}). AccuracyCalculator computes no Recall@K for K > 1.",
        ]
    if "speedup_float32_vs_pml" in evaluation:
        lines += [
            "",
            f"With the float32 screen (what a CPU without fast int8 or bfloat16 products runs): "
            f"**{evaluation['speedup_float32_vs_pml']:.2f}x**. The screen only chooses which pairs are rescored "
            f"exactly; largest difference between screens: {max(evaluation['max_abs_diff_screens'].values()):.1e}.",
        ]
    lines += _nmi_lines(evaluation.get("nmi"))
    subset = evaluation.get("torchmetrics_subset")
    if subset:
        lines += [
            "",
            f"torchmetrics (RetrievalHitRate for Recall@K, RetrievalRPrecision) on a subset of "
            f"{subset['num_items']:,} items, {subset['num_classes']} classes; "
            f"{evaluation['torchmetrics_full_size_note']}.",
            "",
            EVAL_HEADER,
            EVAL_RULE,
            _eval_row("ours", evaluation["ours_small"]),
            _eval_row("torchmetrics", evaluation["torchmetrics_small"]),
        ]
        if "max_abs_diff_vs_torchmetrics" in evaluation:
            diffs = evaluation["max_abs_diff_vs_torchmetrics"]
            lines += ["", f"Largest value difference: {max(diffs.values()):.2e} (float32 in torchmetrics)."]
    return lines


def render_query_gallery(result: dict[str, Any] | None) -> list[str]:
    """Queries searched in a separate gallery (In-Shop size): seconds and values, ours vs AccuracyCalculator."""
    if not result:
        return []
    data = result["data"]
    in_shop = (data["num_queries"], data["num_gallery"], data["num_classes"]) == (14_218, 12_612, 3_985)
    lines = [
        "",
        f"## Query / gallery evaluation ({data['num_queries']:,} queries in {data['num_gallery']:,} gallery items x "
        f"{data['dim']}, {data['num_classes']:,} classes{': DeepFashion In-Shop test size' if in_shop else ''})",
        "",
        "| method | time (s) | peak RSS (GB) | Recall@1 | Recall@50 | R-Prec. | MAP@R |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in (("ours_gallery", "ours (CPU)"), ("ours_gallery_cuda", "ours (GPU)"),
                      ("pml_gallery", "pml AccuracyCalculator (ref_includes_query=False)")):  # fmt: skip
        if key not in result:
            continue
        entry = result[key]
        if "error" in entry:
            lines.append(f"| {name} | failed: {entry['error'].strip().splitlines()[-1]} | | | | | |")
            continue
        m = entry["metrics"]
        lines.append(
            f"| {name} | {entry['seconds']:.2f} | {entry['peak_rss_mb'] / 1024:.2f} | "
            f"{_fmt(m.get('recall@1', m.get('precision_at_1')), 4)} | {_fmt(m.get('recall@50'), 4)} | "
            f"{_fmt(m.get('r_precision'), 4)} | {_fmt(m.get('map@r', m.get('mean_average_precision_at_r')), 4)} |"
        )
    if "speedup_vs_pml" in result:
        lines += ["", f"Speed-up over AccuracyCalculator: {result['speedup_vs_pml']:.2f}x; largest value difference: "
                  f"{max(result['max_abs_diff_vs_pml'].values()):.1e}."]  # fmt: skip
    return lines


def render_lightning_overhead(overhead: dict[str, Any] | None) -> list[str]:
    """The plain loop's and Lightning's median step, CPU time (the headline) and wall clock."""
    if not overhead:
        return []
    s = overhead["setting"]
    return [
        "",
        f"## Lightning overhead: {s['backbone']} @{s['image_size']} px, batch {s['batch_size']}, "
        f"triplet + semi-hard miner, AdamW, {s['steps']} steps after {s['warmup_steps']} warm-up, CPU, "
        f"{overhead['threads']} torch thread(s)",
        "",
        f"Median step, process CPU time: plain loop {overhead['plain_step_cpu_ms']:.1f} ms, Lightning "
        f"{overhead['lightning_step_cpu_ms']:.1f} ms: ratio **{overhead['ratio']:.3f}**. Wall clock: "
        f"{overhead['plain_step_ms']:.1f} ms vs {overhead['lightning_step_ms']:.1f} ms, ratio "
        f"{overhead['ratio_wall']:.3f}. Medians over {len(overhead['rounds'])} rounds, each running both loops "
        "back to back; CPU time is the framework's extra work, wall time also measures the other processes of a "
        "shared machine.",
    ]


def render_training(training: dict[str, Any] | None) -> list[str]:
    """Training images/s with each data path and with the model alone."""
    if not training:
        return []
    s = training["setting"]
    return [
        "",
        f"## Training throughput: {s['backbone']} @{s['image_size']} px, batch {s['batch_size']}, "
        f"{s['precision']}, channels_last={s['channels_last']}, compile={s['compile']}, "
        f"{s['num_workers']} workers, {s['accelerator']}"
        + (f", {s['threads']} torch thread(s)" if s.get("threads") else ""),
        "",
        "| data path | images/s |",
        "|---|---|",
        f"| PIL (decode + augment in workers) | {training['pil']['images_per_s']:,.0f} |",
        f"| fast (uint8 cache, tensor augmentation on the device) | {training['fast']['images_per_s']:,.0f} |",
        f"| model alone (batches already on the device) | {training['model_only']['images_per_s']:,.0f} |",
        "",
        f"Fast path / PIL path: **{training['fast_over_pil']:.2f}x**. Synthetic {s['source_size']} px JPEGs "
        f"({s['num_classes']} classes x {s['images_per_class']}).",
    ]


def render_gpu_evaluation(gpu: dict[str, Any] | None) -> list[str]:
    """The whole SOP-size test evaluation on the GPU: embedding, then metrics."""
    if not gpu:
        return []
    return [
        "",
        f"## Whole SOP-size test evaluation on the GPU ({gpu['num_items']:,} images, {gpu['backbone']} "
        f"@{gpu['image_size']}, bf16, batch {gpu['batch_size']}{', compiled' if gpu['compiled'] else ''})",
        "",
        f"Embedding {gpu['embedding_seconds']:.2f} s ({gpu['images_per_s']:,.0f} images/s, uint8 images in pinned "
        f"host memory), metrics {gpu['metric_seconds']:.2f} s: total **{gpu['seconds']:.2f} s**.",
    ]


def _eval_row(name: str, result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"| {name} | {result['skipped']} | | | | | | |"
    if "error" in result:
        return f"| {name} | failed: {result['error'].strip().splitlines()[-1]} | | | | | | |"
    m = result["metrics"]
    recall1 = m.get("recall@1", m.get("precision_at_1"))
    return (
        f"| {name} | {result['seconds']:.2f} | {result['peak_rss_mb'] / 1024:.2f} | "
        f"{result['peak_above_baseline_mb'] / 1024:.2f} | {_fmt(recall1, 4)} | {_fmt(m.get('recall@1000'), 4)} | "
        f"{_fmt(m.get('r_precision'), 4)} | {_fmt(m.get('map@r', m.get('mean_average_precision_at_r')), 4)} |"
    )


def _nmi_lines(nmi: dict[str, Any] | None) -> list[str]:
    """The NMI paragraph: its k-means cost here, and what the CPU budget makes of it."""
    if not nmi:
        return []
    full = nmi["full_schedule"]
    lines = ["", f"NMI (k-means, one cluster per class, {full['niter']} iterations x {full['nredo']} runs): "
             f"{nmi['macs_per_iteration']:.2e} multiply-adds per iteration."]  # fmt: skip
    one = nmi.get("cpu_one_iteration", {})
    if "seconds" in one:
        schedule = nmi["cpu_schedule"]
        decision = (
            "left out on the CPU (over the budget even for one short run)"
            if schedule is None
            else f"{schedule['niter']} iterations x {schedule['nredo']} runs on the CPU"
        )
        lines[-1] += (
            f" faiss on the CPU: {one['seconds']:.1f} s per iteration, so the full schedule would take "
            f"~{nmi['cpu_full_schedule_seconds_estimate'] / 60:.0f} min; with the default budget of "
            f"{nmi['cpu_budget_macs']:.0e} multiply-adds (module.nmi_max_macs) it is {decision}."
        )
    cuda = nmi.get("cuda_full_schedule")
    if cuda and "seconds" in cuda:
        lines[-1] += f" GPU (torch k-means), full schedule: **{cuda['seconds']:.2f} s**."
    return lines


def _isa_limits(limits: dict[str, str]) -> str:
    return " ".join(f"{name}={value}" for name, value in limits.items())


def _load(values: list[float] | None) -> str:
    return "?" if not values else f"{values[0]:.1f}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"
