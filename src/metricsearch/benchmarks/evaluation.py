"""Evaluation benchmark: our retrieval metrics against pytorch-metric-learning and torchmetrics, time and memory.

Every method runs in a child process of its own (``python -m metricsearch.benchmarks.evaluation``), which loads the
same embeddings from disk, so its peak resident memory (``ru_maxrss``) is its own: tracemalloc would miss the
BLAS and faiss buffers, where most of the memory goes. Each child imports the same libraries before loading the
data, so the baselines are equal and the peaks comparable.

The data is a synthetic stand-in for the SOP test set (60,502 x 512, 11,316 classes of 2-12 images, the sizes
drawn from a decaying distribution with SOP's mean of 5.35): unit class centres in random directions plus
Gaussian noise, L2-normalised, generated from a seed. Only the shape of the problem matters for speed; the noise
is set so that the metrics land in SOP's range rather than at 1.0.

:func:`measure_query_gallery` times the query / gallery case the same way, at DeepFashion In-Shop's test size
(14,218 queries searched in 12,612 gallery images, 3,985 classes, 512-d), against AccuracyCalculator with
``ref_includes_query=False``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metricsearch.metrics.kmeans import DEFAULT_NMI_MAX_MACS, KMeansSchedule, kmeans_cost, nmi_schedule
from metricsearch.metrics.screen import ScreenProbe, measure_screens, screen_is_fast

SOP_TEST_ITEMS = 60_502
SOP_TEST_CLASSES = 11_316
SOP_DIM = 512
SOP_KS = (1, 10, 100, 1000)
# NMI's k-means: the full schedule, and the part of it timed on the CPU (the full one takes ~20 minutes there).
NMI_FULL = KMeansSchedule(niter=20, nredo=5)
NMI_PROBE = KMeansSchedule(niter=1, nredo=1)
# DeepFashion In-Shop's test protocol: queries searched in a separate gallery; Recall@K as its papers report it.
INSHOP_QUERIES = 14_218
INSHOP_GALLERY = 12_612
INSHOP_CLASSES = 3_985
INSHOP_KS = (1, 10, 20, 30, 40, 50)
# Metrics AccuracyCalculator computes that match ours, by name (ours, theirs).
PML_METRICS = (
    ("precision@1", "precision_at_1"),
    ("r_precision", "r_precision"),
    ("map@r", "mean_average_precision_at_r"),
)


@dataclass(frozen=True)
class EvalData:
    """How to generate the synthetic embeddings."""

    num_items: int = SOP_TEST_ITEMS
    num_classes: int = SOP_TEST_CLASSES
    dim: int = SOP_DIM
    min_size: int = 2
    max_size: int = 12
    noise: float = 2.3
    seed: int = 0


def sop_like_class_sizes(data: EvalData, rng: np.random.Generator) -> np.ndarray:
    """Class sizes in [min_size, max_size] summing to ``num_items``, decaying like SOP's (many pairs, few dozens)."""
    sizes_range = np.arange(data.min_size, data.max_size + 1)
    mean = data.num_items / data.num_classes
    # Geometric weights whose mean matches the target, found by bisection on the decay rate.
    low, high = -5.0, 5.0
    for _ in range(60):
        rate = (low + high) / 2
        weights = np.exp(-rate * sizes_range)
        if (weights * sizes_range).sum() / weights.sum() > mean:
            low = rate
        else:
            high = rate
    sizes = rng.choice(sizes_range, size=data.num_classes, p=weights / weights.sum())
    # Nudge random classes up or down (within bounds) until the total is exact.
    while (excess := int(sizes.sum()) - data.num_items) != 0:
        step = -1 if excess > 0 else 1
        movable = np.flatnonzero(sizes > data.min_size if step < 0 else sizes < data.max_size)
        chosen = rng.choice(movable, size=min(abs(excess), len(movable)), replace=False)
        sizes[chosen] += step
    return sizes


def make_embeddings(data: EvalData) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic (N, D) float32 L2-normalised embeddings and their labels."""
    rng = np.random.default_rng(data.seed)
    sizes = sop_like_class_sizes(data, rng)
    labels = rng.permutation(np.repeat(np.arange(data.num_classes), sizes)).astype(np.int64)
    centers = rng.standard_normal((data.num_classes, data.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[labels]
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(data.noise / math.sqrt(data.dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


@dataclass(frozen=True)
class QueryGalleryData:
    """How to generate synthetic queries and gallery (default: In-Shop's test size)."""

    num_queries: int = INSHOP_QUERIES
    num_gallery: int = INSHOP_GALLERY
    num_classes: int = INSHOP_CLASSES
    dim: int = SOP_DIM
    noise: float = 2.3
    seed: int = 0


def make_query_gallery_embeddings(data: QueryGalleryData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Queries and gallery around the same class centres, every class in both (as in In-Shop).

    Returns:
        ``(queries, query_labels, gallery, gallery_labels)``: float32 L2-normalised embeddings and int64 labels.
    """
    rng = np.random.default_rng(data.seed)
    centers = rng.standard_normal((data.num_classes, data.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    parts = []
    for total in (data.num_queries, data.num_gallery):
        # One item per class, the rest spread at random over the classes.
        sizes = 1 + rng.multinomial(total - data.num_classes, np.full(data.num_classes, 1 / data.num_classes))
        labels = rng.permutation(np.repeat(np.arange(data.num_classes), sizes)).astype(np.int64)
        x = centers[labels]
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(data.noise / math.sqrt(data.dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        parts += [x, labels]
    return parts[0], parts[1], parts[2], parts[3]


# ------------------------------------------------------------------------------------------------------------------
# The methods, run inside the child process


def _run_ours(x: np.ndarray, labels: np.ndarray, device: str | None = None, screen: str = "auto") -> dict[str, float]:
    from metricsearch.metrics import calc_retrieval_metrics

    return calc_retrieval_metrics(x, labels, SOP_KS, compute_nmi=False, device=device, screen=screen)


def _run_nmi_cpu(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """One k-means iteration of one run with faiss, as NMI runs it on the CPU (the full schedule is 20 x 5)."""
    from metricsearch.metrics import calc_nmi

    return {"nmi": calc_nmi(x, labels, niter=NMI_PROBE.niter, nredo=NMI_PROBE.nredo)}


def _run_nmi_cuda(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The whole NMI (20 iterations x 5 runs) with the torch k-means on the GPU."""
    from metricsearch.metrics import calc_nmi

    return {"nmi": calc_nmi(x, labels, niter=NMI_FULL.niter, nredo=NMI_FULL.nredo, device="cuda")}


def _run_pml(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    # k="max_bin_count": R-Precision and MAP@R need every query's R neighbours; AccuracyCalculator has no
    # Recall@K for K > 1.
    calculator = AccuracyCalculator(include=tuple(theirs for _, theirs in PML_METRICS), k="max_bin_count")
    return {k: float(v) for k, v in calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels)).items()}


def _run_torchmetrics(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Recall@K as RetrievalHitRate and RetrievalRPrecision, over per-query score lists of the whole gallery.

    torchmetrics has no MAP@R (RetrievalMAP is the full mAP) and needs one (score, target, query) triple per pair:
    N^2 entries, which is why it only runs on small sets.
    """
    import torch
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalRPrecision

    emb = torch.from_numpy(x)
    lab = torch.from_numpy(labels)
    num = len(lab)
    scores = emb @ emb.T
    keep = ~torch.eye(num, dtype=torch.bool)  # the query itself is not in its gallery
    preds = scores[keep]
    target = (lab[:, None] == lab[None, :])[keep]
    indexes = torch.arange(num)[:, None].expand(num, num)[keep]
    out = {}
    for k in SOP_KS:
        if k < num:
            out[f"recall@{k}"] = float(RetrievalHitRate(top_k=k)(preds, target, indexes=indexes))
    # Queries without any positive count as 0 here; ours leaves them out, so the comparison uses sets without them.
    out["r_precision"] = float(RetrievalRPrecision()(preds, target, indexes=indexes))
    return out


def _run_ours_gallery(
    x: np.ndarray, labels: np.ndarray, gallery_x: np.ndarray, gallery_labels: np.ndarray, device: str | None = None
) -> dict[str, float]:
    from metricsearch.metrics import calc_retrieval_metrics

    return calc_retrieval_metrics(x, labels, INSHOP_KS, compute_nmi=False, device=device, gallery_embeddings=gallery_x,
                                  gallery_labels=gallery_labels)  # fmt: skip


def _run_pml_gallery(
    x: np.ndarray, labels: np.ndarray, gallery_x: np.ndarray, gallery_labels: np.ndarray
) -> dict[str, float]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(include=tuple(theirs for _, theirs in PML_METRICS), k="max_bin_count")
    tensors = [torch.from_numpy(a) for a in (x, labels, gallery_x, gallery_labels)]
    return {k: float(v) for k, v in calculator.get_accuracy(*tensors, ref_includes_query=False).items()}


METHODS = {
    "ours": _run_ours,  # the default: the screen choose_screen picks on this CPU
    "ours_bfloat16": lambda x, labels: _run_ours(x, labels, screen="bfloat16"),
    "ours_int8": lambda x, labels: _run_ours(x, labels, screen="int8"),
    "ours_float32": lambda x, labels: _run_ours(x, labels, screen="float32"),
    "ours_cuda": lambda x, labels: _run_ours(x, labels, device="cuda"),
    "nmi_cpu": _run_nmi_cpu,
    "nmi_cuda": _run_nmi_cuda,
    "pml": _run_pml,
    "torchmetrics": _run_torchmetrics,
    # Queries searched in a separate gallery: the data file holds gallery_x and gallery_labels too.
    "ours_gallery": _run_ours_gallery,
    "ours_gallery_cuda": lambda *arrays: _run_ours_gallery(*arrays, device="cuda"),
    "pml_gallery": _run_pml_gallery,
}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child_main(method: str, data_file: str, out_file: str) -> None:
    """Entry point of the child process: imports everything, loads the data, runs one method, writes JSON."""
    import faiss  # noqa: F401 - imported by every child so that the baselines are equal
    import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401
    import torch
    import torchmetrics.retrieval  # noqa: F401

    import metricsearch.metrics  # noqa: F401

    with np.load(data_file) as archive:
        x, labels = archive["x"], archive["labels"]
        gallery = [archive[name] for name in ("gallery_x", "gallery_labels") if name in archive.files]
    # One small call first, outside the measurement: compiled kernels are loaded, the CUDA context created, faiss
    # and BLAS thread pools started.
    warmup = np.argsort(labels, kind="stable")[:512]  # whole classes, so that there are queries to answer
    if gallery:
        in_warmup = np.isin(gallery[1], labels[warmup])
        METHODS[method](x[warmup], labels[warmup], gallery[0][in_warmup], gallery[1][in_warmup])
    else:
        METHODS[method](x[warmup], labels[warmup])
    if method.endswith("_cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_mb()
    started = time.perf_counter()
    metrics = METHODS[method](x, labels, *gallery)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    result = {
        "method": method,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "peak_above_baseline_mb": peak - baseline,
        "metrics": metrics,
    }
    if method.endswith("_cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if method == "ours":
        from metricsearch.metrics.screen import choose_screen

        result["screen"] = choose_screen(x.shape[1])
    Path(out_file).write_text(json.dumps(result))


def run_method(method: str, data_file: Path, timeout: float = 3600) -> dict[str, Any]:
    """Runs one method in a fresh child process; returns its timing, memory and metrics (or the error)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_file = Path(f.name)
    try:
        # NOTE: this module's own name, so that the child runs this very file wherever the module lives.
        command = [sys.executable, "-m", __spec__.name, method, str(data_file), str(out_file)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        if proc.returncode != 0:
            return {"method": method, "error": proc.stderr[-2000:]}
        return json.loads(out_file.read_text())
    finally:
        out_file.unlink(missing_ok=True)


def compare_values(ours: dict[str, float], theirs: dict[str, float], pairs) -> dict[str, float]:
    """Absolute differences of the metrics both computed."""
    return {mine: abs(ours[mine] - theirs[other]) for mine, other in pairs if mine in ours and other in theirs}


def measure_evaluation(
    data: EvalData, workdir: Path, *, with_cuda: bool, torchmetrics_items: int = 3000, log=print
) -> dict[str, Any]:
    """Times and sizes the evaluation of ``data`` by each method; torchmetrics on a subset it can handle.

    Returns:
        A dict with the data description, one entry per method, value differences, and the ratios of the targets.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    x, labels = make_embeddings(data)
    data_file = workdir / "eval_embeddings.npz"
    np.savez(data_file, x=x, labels=labels)
    log(f"evaluation data: {x.shape[0]:,} x {x.shape[1]} embeddings, {data.num_classes:,} classes "
        f"({time.perf_counter() - started:.1f} s to generate)")  # fmt: skip
    out: dict[str, Any] = {"data": asdict(data)}
    probes = measure_screens(data.dim)
    out["screen_probes"] = {name: asdict(probe) for name, probe in probes.items()}
    methods = ["ours", "ours_bfloat16", "ours_int8", "ours_float32", "pml"] + (["ours_cuda"] if with_cuda else [])
    skips = emulated_screens(probes)
    for method in methods:
        if method in skips:
            out[method] = {"method": method, "skipped": skips[method]}
        else:
            log(f"  {method} ...")
            out[method] = run_method(method, data_file)
        log(f"  {method}: {_summary(out[method])}")
    out["nmi"] = _benchmark_nmi(data, data_file, with_cuda=with_cuda, log=log)

    # torchmetrics needs N^2 (score, target, query) entries: a subset whose classes are all whole and answerable.
    subset_classes = np.unique(labels)[: max(2, data.num_classes * torchmetrics_items // data.num_items)]
    subset = np.isin(labels, subset_classes)
    small_file = workdir / "eval_embeddings_small.npz"
    np.savez(small_file, x=x[subset], labels=labels[subset])
    out["torchmetrics_subset"] = {"num_items": int(subset.sum()), "num_classes": len(subset_classes)}
    for method in ("ours", "torchmetrics"):
        out[f"{method}_small"] = run_method(method, small_file)
        log(f"  {method} on {int(subset.sum()):,} items: {_summary(out[f'{method}_small'])}")
    entries = x.shape[0] * (x.shape[0] - 1)
    out["torchmetrics_full_size_note"] = (
        f"not run at {x.shape[0]:,} items: it needs {entries:,} (score, target, query) entries, "
        f"{entries * 13 / 1e9:.0f} GB before sorting"
    )
    data_file.unlink(missing_ok=True)
    small_file.unlink(missing_ok=True)

    ours, pml = out["ours"], out["pml"]
    if _ran(ours) and _ran(pml):
        out["speedup_vs_pml"] = pml["seconds"] / ours["seconds"]
        out["memory_ratio_vs_pml"] = ours["peak_rss_mb"] / pml["peak_rss_mb"]
        out["memory_above_baseline_ratio_vs_pml"] = ours["peak_above_baseline_mb"] / pml["peak_above_baseline_mb"]
        out["max_abs_diff_vs_pml"] = compare_values(ours["metrics"], pml["metrics"], PML_METRICS)
    plain = out["ours_float32"]
    if _ran(plain) and _ran(pml):
        out["speedup_float32_vs_pml"] = pml["seconds"] / plain["seconds"]
    if _ran(ours):
        others = [out[m] for m in ("ours_bfloat16", "ours_int8", "ours_float32") if _ran(out[m])]
        out["max_abs_diff_screens"] = {
            k: max((abs(value - o["metrics"][k]) for o in others), default=0.0) for k, value in ours["metrics"].items()
        }
    small_ours, small_tm = out["ours_small"], out["torchmetrics_small"]
    if "error" not in small_ours and "error" not in small_tm:
        pairs = [(k, k) for k in small_tm["metrics"]]
        out["max_abs_diff_vs_torchmetrics"] = compare_values(small_ours["metrics"], small_tm["metrics"], pairs)
    return out


def measure_query_gallery(data: QueryGalleryData, workdir: Path, *, with_cuda: bool, log=print) -> dict[str, Any]:
    """Times the query / gallery evaluation of ``data`` (In-Shop size by default): ours on the CPU (and the GPU),
    and AccuracyCalculator with ``ref_includes_query=False``, each in a child process of its own.

    Returns:
        A dict with the data description, one entry per method and the value differences from AccuracyCalculator.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    queries, query_labels, gallery, gallery_labels = make_query_gallery_embeddings(data)
    data_file = workdir / "query_gallery_embeddings.npz"
    np.savez(data_file, x=queries, labels=query_labels, gallery_x=gallery, gallery_labels=gallery_labels)
    log(f"query / gallery data: {len(queries):,} queries in {len(gallery):,} gallery items x {data.dim}, "
        f"{data.num_classes:,} classes")  # fmt: skip
    out: dict[str, Any] = {"data": asdict(data)}
    for method in ["ours_gallery", "pml_gallery"] + (["ours_gallery_cuda"] if with_cuda else []):
        log(f"  {method} ...")
        out[method] = run_method(method, data_file)
        log(f"  {method}: {_summary(out[method])}")
    data_file.unlink(missing_ok=True)
    ours, pml = out["ours_gallery"], out["pml_gallery"]
    if _ran(ours) and _ran(pml):
        out["speedup_vs_pml"] = pml["seconds"] / ours["seconds"]
        out["max_abs_diff_vs_pml"] = compare_values(ours["metrics"], pml["metrics"], PML_METRICS)
    return out


def _benchmark_nmi(data: EvalData, data_file: Path, *, with_cuda: bool, log=print) -> dict[str, Any]:
    """What NMI costs at this size: one faiss iteration timed on the CPU, the full schedule on a GPU."""
    cost_per_iteration = kmeans_cost(data.num_items, data.num_classes, data.dim, KMeansSchedule(1, 1))
    budget = DEFAULT_NMI_MAX_MACS
    schedule = nmi_schedule(data.num_items, data.num_classes, data.dim, NMI_FULL, budget)
    result: dict[str, Any] = {
        "macs_per_iteration": cost_per_iteration,
        "full_schedule": asdict(NMI_FULL),
        "cpu_budget_macs": budget,
        "cpu_schedule": asdict(schedule) if schedule else None,
    }
    log("  nmi_cpu (one k-means iteration) ...")
    result["cpu_one_iteration"] = run_method("nmi_cpu", data_file)
    if _ran(result["cpu_one_iteration"]):
        seconds = result["cpu_one_iteration"]["seconds"]
        result["cpu_full_schedule_seconds_estimate"] = seconds * NMI_FULL.niter * NMI_FULL.nredo
        log(f"  nmi_cpu: {seconds:.1f} s per iteration; the full {NMI_FULL.niter} x {NMI_FULL.nredo} schedule "
            f"~{seconds * NMI_FULL.niter * NMI_FULL.nredo / 60:.0f} min; within the CPU budget: "
            f"{'skipped' if schedule is None else schedule}")  # fmt: skip
    if with_cuda:
        log("  nmi_cuda (full schedule) ...")
        result["cuda_full_schedule"] = run_method("nmi_cuda", data_file)
        log(f"  nmi_cuda: {_summary(result['cuda_full_schedule'])}")
    return result


def emulated_screens(probes: dict[str, ScreenProbe]) -> dict[str, str]:
    """The forced-screen methods to skip, each with the reason: the screens ``choose_screen`` found slow here.

    On an AVX2-only CPU torch emulates bfloat16 and int8 products: forcing them took 142 s and 491 s at SOP size,
    which measures the emulation, not the method.
    """
    skips = {}
    baseline = probes["float32"]
    for precision in ("bfloat16", "int8"):
        probe = probes.get(precision)
        if probe is None:
            skips[f"ours_{precision}"] = f"skipped: this build of torch has no {precision} product on the CPU"
        elif not probe.accurate:
            skips[f"ours_{precision}"] = f"skipped: the {precision} product is outside its error margin here"
        elif not screen_is_fast(probes, precision):
            why = "emulated on this CPU" if probe.seconds >= baseline.seconds else "not 1.5x faster than float32 here"
            skips[f"ours_{precision}"] = (
                f"skipped: {why} ({precision} product {probe.seconds * 1e3:.1f} ms vs float32 "
                f"{baseline.seconds * 1e3:.1f} ms per probe block)"
            )
    return skips


def _ran(result: dict[str, Any]) -> bool:
    return "error" not in result and "skipped" not in result


def _summary(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return result["skipped"]
    if "error" in result:
        return "FAILED: " + result["error"].strip().splitlines()[-1]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items() if not k.startswith("num_queries"))
    return f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_mb'] / 1024:.2f} GB; {metrics}"


if __name__ == "__main__":
    child_main(*sys.argv[1:4])
