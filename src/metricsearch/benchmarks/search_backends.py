"""Index backends side by side: faiss exact / IVF / HNSW and Milvus Lite on one synthetic gallery.

Per backend and index kind: build time, the time to add 1,000 more images, queries per second with 1 and with
16 concurrent clients (threads, one query per request, as the server sends them), recall@k of the batched top-k
against exact search, and the peak memory the index added to its process.

Each measurement runs in its own process (spawned, so nothing is shared), which reads the gallery from ``.npy``
files: its peak resident memory (sampled) minus what it held once the arrays were loaded is the memory of
building and searching that index, Milvus Lite's embedded server included (it runs inside the process).
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from metricsearch.benchmarks.search import make_clustered_embeddings, recall_against

CLIENTS = (1, 16)
ADD_COUNT = 1000
# Queries in each batch of the recall measurement (a Milvus search request carries one batch).
RECALL_BATCH = 100


def _rss_mib() -> float:
    """Resident memory of this process now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return pages * resource.getpagesize() / 2**20


class PeakMemory:
    """The most resident memory seen above a baseline, sampled every 10 ms by a thread while it runs.

    ``ru_maxrss`` alone would not do: importing the libraries peaks higher than a small index ever adds.
    """

    def __init__(self) -> None:
        self.baseline = _rss_mib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mib())

    def stop(self) -> float:
        """Stops sampling; returns the peak above the baseline, MiB."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())
        return self.peak - self.baseline


def _qps(search_one: Any, queries: np.ndarray, clients: int, seconds: float) -> float:
    """Queries per second of ``clients`` threads sending single-query searches back to back for ``seconds``.

    Requests still running at the deadline are waited for and counted, so slow backends are measured too.
    """
    done = [0] * clients
    deadline = time.perf_counter() + seconds

    def client(number: int) -> None:
        i = number
        while time.perf_counter() < deadline:
            search_one(queries[i % len(queries)])
            done[number] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - started)


def _faiss_row(kind: str, gallery: np.ndarray, extra: np.ndarray, queries: np.ndarray, k: int, seconds: float) -> dict:
    import faiss

    from metricsearch.search.index import IndexSpec, create_faiss_index

    faiss.omp_set_num_threads(max(1, multiprocessing.cpu_count()))
    started = time.perf_counter()
    index, params = create_faiss_index(gallery, IndexSpec(kind))
    build_s = time.perf_counter() - started
    _, ids = index.search(queries, k)
    # One thread per query, as a server thread answers one request (see benchmarks.search._latencies).
    faiss.omp_set_num_threads(1)
    qps = {c: _qps(lambda q: index.search(q[None], k), queries, c, seconds) for c in CLIENTS}
    started = time.perf_counter()
    index.add(extra)
    add_s = time.perf_counter() - started
    return {"params": params, "build_s": build_s, "add_1k_s": add_s, "qps": qps, "ids": ids}


def _milvus_row(kind: str, gallery: np.ndarray, extra: np.ndarray, queries: np.ndarray, k: int, seconds: float) -> dict:
    from metricsearch.search import milvus_index as mi
    from metricsearch.search.index import IndexSpec

    folder = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
    client = mi.connect(str(folder / "bench.db"))
    params = mi._index_params(IndexSpec(kind), len(gallery))
    started = time.perf_counter()
    mi._create_collection(client, "bench", gallery.shape[1], params)
    paths = [f"c{i % 1000:04d}/{i:08d}.jpg" for i in range(len(gallery) + len(extra))]
    mi._insert(client, "bench", list(range(len(gallery))), gallery, paths[: len(gallery)], [None] * len(gallery))
    mi._flush(client, "bench")
    client.load_collection("bench")
    search_params = {"metric_type": "IP", "params": mi._search_params(params)}

    def search(batch: np.ndarray) -> list:
        return client.search("bench", data=batch.tolist(), limit=k, search_params=search_params)

    search(queries[:1])  # the first search loads the segments: part of building
    build_s = time.perf_counter() - started
    ids = np.array(
        [
            [hit["id"] for hit in answer]
            for s in range(0, len(queries), RECALL_BATCH)
            for answer in search(queries[s : s + RECALL_BATCH])
        ]
    )
    qps = {c: _qps(lambda q: search(q[None]), queries, c, seconds) for c in CLIENTS}
    started = time.perf_counter()
    n = len(gallery)
    mi._insert(client, "bench", list(range(n, n + len(extra))), extra, paths[n:], [None] * len(extra))
    mi._flush(client, "bench")
    add_s = time.perf_counter() - started
    return {"params": params, "build_s": build_s, "add_1k_s": add_s, "qps": qps, "ids": ids}


def _measure(backend: str, kind: str, files: dict[str, str], k: int, seconds: float, results: Any) -> None:
    gallery, extra, queries = (np.load(files[name]) for name in ("gallery", "extra", "queries"))
    memory = PeakMemory()
    try:
        row = (_faiss_row if backend == "faiss" else _milvus_row)(kind, gallery, extra, queries, k, seconds)
        row["peak_mib"] = memory.stop()
        results.put(row)
    except Exception as err:  # noqa: BLE001 - reported as the row's error
        results.put({"error": f"{type(err).__name__}: {err}"})


def run_backend_benchmark(
    n: int = 100_000,
    dim: int = 128,
    num_queries: int = 1000,
    k: int = 10,
    clusters: int = 1000,
    spread: float = 1.5,
    seed: int = 0,
    seconds: float = 10.0,
    backends: tuple[tuple[str, str], ...] = (
        ("faiss", "flat"),
        ("faiss", "ivf"),
        ("faiss", "hnsw"),
        ("milvus", "flat"),
    ),
) -> dict[str, Any]:
    """Measures each ``(backend, kind)`` on one clustered gallery; the first must be exact (the recall reference)."""
    rng = np.random.default_rng(seed)
    gallery, centres = make_clustered_embeddings(n, dim, clusters, spread, rng)
    extra, _ = make_clustered_embeddings(ADD_COUNT, dim, clusters, spread, rng, centres=centres)
    queries, _ = make_clustered_embeddings(num_queries, dim, clusters, spread, rng, centres=centres)
    context = multiprocessing.get_context("spawn")
    rows = []
    exact_ids = None
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for name, array in (("gallery", gallery), ("extra", extra), ("queries", queries)):
            files[name] = str(Path(folder) / f"{name}.npy")
            np.save(files[name], array)
        del gallery
        for backend, kind in backends:
            results = context.Queue()
            process = context.Process(target=_measure, args=(backend, kind, files, k, seconds, results))
            process.start()
            row = results.get()
            process.join()
            row.update(backend=backend, kind=kind)
            if "error" not in row:
                ids = row.pop("ids")
                exact_ids = ids if exact_ids is None else exact_ids
                row[f"recall@{k}"] = recall_against(ids, exact_ids)
            rows.append(row)
    return {
        "settings": {"n": n, "dim": dim, "queries": num_queries, "k": k, "clusters": clusters, "spread": spread},
        "qps_seconds": seconds,
        "cpus": multiprocessing.cpu_count(),
        "rows": rows,
    }
