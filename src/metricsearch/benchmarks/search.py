"""Search benchmark: exact vs IVF vs HNSW faiss indexes on a large synthetic gallery of embeddings.

Measures, per index kind: build time and vectors indexed per second (training included), single-query
latency p50 / p99 (one query at a time, as the web server issues them), batched query throughput, and the
approximate indexes' recall@k against exact search (the fraction of the exact top-k they also return).

The gallery is random but clustered like real embeddings (points scattered around class centres on the unit
sphere); uniformly random vectors would make every approximate index look bad, since they have no
neighbourhood structure to exploit. Optionally, the model's embedding throughput on real image files gives
the end-to-end images per second of building an index.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image

from metricsearch.inference.model_loading import Embedder
from metricsearch.inference.predict_embeddings import embed_files, make_predict_trainer
from metricsearch.search.index import IndexSpec, create_faiss_index


def make_clustered_embeddings(
    count: int, dim: int, clusters: int, spread: float, rng: np.random.Generator, centres: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` unit vectors around ``clusters`` random unit centres; returns (vectors, centres).

    Args:
        count: number of vectors.
        dim: their size.
        clusters: number of centres (ignored when ``centres`` is given).
        spread: expected norm of the offset from the centre before re-normalising; two points of one cluster
            then have a cosine similarity of about 1 / (1 + spread ** 2) (0.3 at the default 1.5, a hard
            fine-grained gallery; at 0.8 every index finds the exact top 10).
        rng: random generator.
        centres: reuse these centres (queries drawn from the gallery's classes).
    """
    if centres is None:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    assignment = rng.integers(len(centres), size=count)
    noise = rng.standard_normal((count, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    vectors = centres[assignment] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors, dtype=np.float32), centres


def recall_against(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k ids that the approximate top-k also holds."""
    k = exact.shape[1]
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k)


def _latencies(index: faiss.Index, queries: np.ndarray, k: int, threads: int) -> np.ndarray:
    """Seconds per single-query search, one query at a time, with ``threads`` OpenMP threads."""
    previous = faiss.omp_get_max_threads()
    # NOTE: one query is too little work to share: with several threads, each search waits at OpenMP
    # barriers, and on a machine with any other load that wait dominates (16 ms instead of 0.2 ms measured
    # for an exact search of 20k vectors on 2 busy cores). A server thread answers one request on one core.
    faiss.omp_set_num_threads(threads)
    try:
        times = np.empty(len(queries))
        for i in range(len(queries)):
            started = time.perf_counter()
            index.search(queries[i : i + 1], k)
            times[i] = time.perf_counter() - started
    finally:
        faiss.omp_set_num_threads(previous)
    return times


def benchmark_index(
    spec: IndexSpec,
    gallery: np.ndarray,
    queries: np.ndarray,
    k: int,
    exact_ids: np.ndarray | None,
    query_threads: int = 1,
) -> tuple[dict[str, Any], np.ndarray]:
    """Builds one index kind and measures it; returns the row of numbers and its batched top-k ids."""
    started = time.perf_counter()
    index, params = create_faiss_index(gallery, spec)
    build_s = time.perf_counter() - started
    latencies = _latencies(index, queries, k, query_threads)
    started = time.perf_counter()
    _, ids = index.search(queries, k)
    batch_s = time.perf_counter() - started
    row = {
        "index": spec.kind,
        "params": params,
        "build_s": build_s,
        "build_vectors_per_s": len(gallery) / build_s,
        "query_p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "query_p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "batch_queries_per_s": len(queries) / batch_s,
        f"recall@{k}": 1.0 if exact_ids is None else recall_against(ids, exact_ids),
    }
    return row, ids


def measure_embedding_throughput(embedder: Embedder, count: int = 256, batch_size: int = 64) -> dict[str, float]:
    """Images per second of decoding + embedding ``count`` JPEG files through the Lightning predict loop."""
    rng = np.random.default_rng(0)
    size = max(64, embedder.preprocessing["resize_size"] or embedder.preprocessing["image_size"])
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(count):
            path = Path(folder) / f"{i:05d}.jpg"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(path)
        trainer = make_predict_trainer(progress_bar=False)
        started = time.perf_counter()
        embed_files(embedder, paths, folder, trainer, batch_size=batch_size)
        seconds = time.perf_counter() - started
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


def run_search_benchmark(
    n: int = 100_000,
    dim: int = 128,
    num_queries: int = 1000,
    k: int = 10,
    clusters: int = 1000,
    spread: float = 1.5,
    specs: list[IndexSpec] | None = None,
    seed: int = 0,
    embedder: Embedder | None = None,
    query_threads: int = 1,
) -> dict[str, Any]:
    """Runs every index kind on one synthetic gallery; returns settings, machine and one row per kind.

    The exact (flat) index runs first and gives the reference top-k for recall. Builds and batched searches
    use every faiss thread; single-query latencies use ``query_threads``.
    """
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    gallery, centres = make_clustered_embeddings(n, dim, clusters, spread, rng)
    queries, _ = make_clustered_embeddings(num_queries, dim, clusters, spread, rng, centres=centres)
    generate_s = time.perf_counter() - started
    specs = specs or [IndexSpec("flat"), IndexSpec("ivf"), IndexSpec("hnsw")]
    if specs[0].kind != "flat":
        specs = [IndexSpec("flat"), *specs]
    rows, exact_ids = [], None
    for spec in specs:
        row, ids = benchmark_index(spec, gallery, queries, k, exact_ids, query_threads)
        if exact_ids is None:
            exact_ids = ids
        rows.append(row)
    result: dict[str, Any] = {
        "settings": {
            "n": n,
            "dim": dim,
            "queries": num_queries,
            "k": k,
            "clusters": clusters,
            "spread": spread,
            "query_threads": query_threads,
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "faiss_threads": faiss.omp_get_max_threads()},
        "generate_s": generate_s,
        "indexes": rows,
    }
    if embedder is not None:
        embedding = measure_embedding_throughput(embedder)
        embedding["model"] = embedder.describe()
        result["embedding"] = embedding
        for row in rows:
            # Embedding and adding run one after the other, so their per-image times add up.
            row["build_images_per_s"] = 1.0 / (1.0 / embedding["images_per_s"] + 1.0 / row["build_vectors_per_s"])
    return result


def format_search_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_search_benchmark`'s rows."""
    s = result["settings"]
    k = s["k"]
    lines = [
        f"gallery {s['n']:,} x {s['dim']} (clustered: {s['clusters']} centres), {s['queries']} queries, k={k}, "
        f"faiss threads {result['machine']['faiss_threads']} (single-query latency: {s['query_threads']})",
    ]
    with_images = "embedding" in result
    header = f"{'index':<6} {'params':<46} {'build s':>8} {'vec/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
    header += f"{'batch q/s':>10} {'recall@' + str(k):>10}" + (f" {'img/s':>8}" if with_images else "")
    lines += [header, "-" * len(header)]
    for row in result["indexes"]:
        params = ", ".join(f"{key}={value}" for key, value in row["params"].items() if key != "kind") or "exact"
        line = (
            f"{row['index']:<6} {params:<46} {row['build_s']:>8.2f} {row['build_vectors_per_s']:>10,.0f} "
            f"{row['query_p50_ms']:>8.3f} {row['query_p99_ms']:>8.3f} {row['batch_queries_per_s']:>10,.0f} "
            f"{row[f'recall@{k}']:>10.4f}"
        )
        if with_images:
            line += f" {row['build_images_per_s']:>8.1f}"
        lines.append(line)
    if with_images:
        e = result["embedding"]
        lines.append(
            f"embedding ({e['model']}): {e['images_per_s']:.1f} images/s; img/s = end-to-end index build (embed + add)"
        )
    return "\n".join(lines)
