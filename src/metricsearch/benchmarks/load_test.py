"""A bounded load test of the search server: many concurrent clients for a fixed time, on loopback.

Each client is a thread with its own keep-alive HTTP connection that sends searches back to back until the
deadline. Queries are gallery images fetched from the server itself, so any server can be tested without access
to its files: an *upload* sends an image's bytes (the server decodes and embeds it, then searches), a *path*
query names a gallery image (the server searches with the stored embedding, on either backend). Every answer is
compared with the answer the server gave to the same query alone, before the clock started, so a wrong answer
under concurrency counts as an error just like an HTTP error or a timeout.

Bounded by construction: at most :data:`MAX_CLIENTS` clients, :data:`MAX_DURATION_S` seconds, a timeout on every
request, and requests still in flight at the deadline are waited for (and counted) but no new ones start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from metricsearch.search.errors import RequestError, SearchError, check_k
from metricsearch.utils.atomic_io import atomic_write_text

log = logging.getLogger(__name__)

MODES = ("upload", "path", "mixed")
MAX_CLIENTS = 256
MAX_DURATION_S = 600.0
MAX_QUERIES = 1000
SERVER_START_TIMEOUT_S = 180.0


class LoadTestError(SearchError):
    """The load test cannot run: bad settings, or a server that does not start or answer correctly alone."""


@dataclass(frozen=True)
class LoadTestSettings:
    """What the load test sends.

    Attributes:
        clients: concurrent clients (threads, one connection each).
        duration_s: how long new requests are started, in seconds.
        mode: ``upload`` (decode + embed + search), ``path`` (search with a stored embedding) or ``mixed``
            (the two alternate).
        k: results per search.
        queries: distinct gallery images used as queries (the first ones of the gallery listing, spread evenly).
        timeout_s: limit of each request; one that takes longer counts as an error.
    """

    clients: int = 16
    duration_s: float = 20.0
    mode: str = "mixed"
    k: int = 10
    queries: int = 32
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise LoadTestError(f"clients={self.clients} must be between 1 and {MAX_CLIENTS}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise LoadTestError(f"duration={self.duration_s} must be more than 0 and at most {MAX_DURATION_S:.0f} s")
        if self.mode not in MODES:
            raise LoadTestError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        if not 1 <= self.queries <= MAX_QUERIES:
            raise LoadTestError(f"queries={self.queries} must be between 1 and {MAX_QUERIES}")
        try:
            check_k(self.k)
        except RequestError as err:
            raise LoadTestError(str(err)) from err
        if self.timeout_s <= 0:
            raise LoadTestError(f"timeout={self.timeout_s} must be positive")


@dataclass(frozen=True)
class Query:
    """One search request: an upload of ``data`` or a click on ``path``, and the answer it got when sent alone."""

    kind: str
    path: str
    data: bytes | None
    expected: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sample:
    """One request's outcome: its kind, latency, and an error description (None when it succeeded)."""

    kind: str
    latency_s: float
    error: str | None


def send_query(http: httpx.Client, query: Query, k: int) -> tuple[str, ...]:
    """Sends one search; returns the result paths, raises on any HTTP error."""
    if query.kind == "upload":
        files = {"file": (Path(query.path).name, query.data, "application/octet-stream")}
        response = http.post("/api/search", files=files, data={"k": str(k)})
    else:
        response = http.post("/api/search", data={"path": query.path, "k": str(k)})
    response.raise_for_status()
    return tuple(hit["path"] for hit in response.json()["results"])


@dataclass(frozen=True)
class SetupError:
    """A gallery image that could not become a query: its path and what went wrong (e.g. ``HTTP 404 ...``)."""

    path: str
    error: str


def prepare_queries(
    http: httpx.Client, settings: LoadTestSettings
) -> tuple[list[Query], dict[str, Any], list[SetupError]]:
    """Picks gallery images as queries, downloads those to upload, and records each one's answer alone.

    A gallery image the server lists but will not serve (e.g. a link out of the gallery root), or whose search
    fails even alone, is an error of the server: it is counted by its HTTP status, and the test goes on
    with the other queries.

    Returns:
        The queries (with their expected answers), the server's ``/api/info``, and the images left out.

    Raises:
        LoadTestError: the server does not answer, has an empty gallery, or no chosen image can be a query.
    """
    try:
        info = http.get("/api/info").raise_for_status().json()
        listing = http.get("/api/gallery", params={"limit": 500}).raise_for_status().json()
    except httpx.HTTPError as err:
        raise LoadTestError(f"the server at {http.base_url} does not answer its API ({err})") from err
    items = listing["items"]
    if not items:
        raise LoadTestError(f"the server at {http.base_url} serves an empty gallery")
    chosen = [items[int(i)] for i in np.linspace(0, len(items) - 1, min(settings.queries, len(items)))]
    kinds = {"upload": ["upload"], "path": ["path"], "mixed": ["upload", "path"]}[settings.mode]
    queries, left_out = [], []
    for number, item in enumerate(chosen):
        kind = kinds[number % len(kinds)]
        step = "fetching the gallery image"
        try:
            data = http.get(item["url"]).raise_for_status().content if kind == "upload" else None
            step = f"{kind} search sent alone"
            expected = send_query(http, Query(kind, item["path"], data), settings.k)
        except httpx.HTTPStatusError as err:
            left_out.append(SetupError(item["path"], f"HTTP {err.response.status_code} ({step})"))
            continue
        except httpx.HTTPError as err:
            raise LoadTestError(f"{step} for {item['path']} failed: {err}") from err
        queries.append(Query(kind, item["path"], data, expected))
    if not queries:
        kinds_seen = ", ".join(sorted({e.error for e in left_out}))
        raise LoadTestError(f"none of the {len(chosen)} gallery images chosen as queries can be used: {kinds_seen}")
    if left_out:
        first = left_out[0]
        log.warning("%d gallery images left out of the queries, e.g. %s: %s", len(left_out), first.path, first.error)
    return queries, info, left_out


@dataclass
class _Clock:
    """When the clients start (``started`` is set) and until when they start new requests."""

    started: threading.Event
    deadline: float = 0.0


def _client_loop(
    base_url: str, queries: Sequence[Query], settings: LoadTestSettings, first: int, clock: _Clock
) -> list[Sample]:
    samples = []
    with httpx.Client(base_url=base_url, timeout=settings.timeout_s) as http:
        clock.started.wait()
        position = first
        while time.perf_counter() < clock.deadline:
            query = queries[position % len(queries)]
            position += 1
            began = time.perf_counter()
            try:
                answer = send_query(http, query, settings.k)
                error = None if answer == query.expected else "wrong answer"
            except httpx.HTTPStatusError as err:
                error = f"HTTP {err.response.status_code}"
            except httpx.HTTPError as err:
                error = type(err).__name__
            except (ValueError, KeyError, TypeError):
                error = "malformed response"
            samples.append(Sample(query.kind, time.perf_counter() - began, error))
    return samples


def run_load_test(base_url: str, settings: LoadTestSettings | None = None) -> dict[str, Any]:
    """Runs ``settings.clients`` concurrent clients against the server at ``base_url`` for ``settings.duration_s``.

    Returns:
        The report: settings, requests, errors (and their kinds: ``HTTP <status>``, timeouts, wrong answers, and
        gallery images that could not become queries), throughput, latency percentiles overall and per query
        kind, and what the server said about its index.
    """
    settings = settings or LoadTestSettings()
    with httpx.Client(base_url=base_url, timeout=settings.timeout_s) as http:
        queries, info, left_out = prepare_queries(http, settings)
    clock = _Clock(threading.Event())
    results: list[list[Sample]] = [[] for _ in range(settings.clients)]
    failures: list[BaseException] = []

    def client(number: int) -> None:
        try:
            # Clients start at different queries, so they do not all ask the same thing at once.
            first = number * len(queries) // settings.clients
            results[number] = _client_loop(base_url, queries, settings, first, clock)
        except BaseException as err:  # noqa: BLE001 - reported after the run instead of dying silently in a thread
            failures.append(err)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(settings.clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    clock.deadline = began + settings.duration_s
    clock.started.set()
    for thread in threads:
        # The last requests may start just before the deadline and take up to the request timeout.
        thread.join(max(0.0, clock.deadline + settings.timeout_s + 10 - time.perf_counter()))
    elapsed = time.perf_counter() - began
    if any(thread.is_alive() for thread in threads):
        raise LoadTestError("load-test clients did not finish within their request timeout after the deadline")
    if failures:
        raise LoadTestError(f"{len(failures)} load-test clients crashed: {failures[0]!r}") from failures[0]
    samples = [sample for per_client in results for sample in per_client]
    return summarize(samples, elapsed, settings, base_url, info, left_out)


def _latency_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ms = np.asarray(latencies) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(ms.max()), "mean": float(ms.mean())}


def summarize(
    samples: Sequence[Sample],
    elapsed_s: float,
    settings: LoadTestSettings,
    base_url: str,
    info: dict[str, Any],
    left_out: Sequence[SetupError] = (),
) -> dict[str, Any]:
    """The load-test report of ``samples`` (see :func:`run_load_test`).

    ``errors`` counts the failed requests and the gallery images that could not become queries (``left_out``,
    also listed under ``setup_errors``); ``error_kinds`` counts both by kind.
    """

    def part(chosen: Sequence[Sample]) -> dict[str, Any]:
        errors = [s for s in chosen if s.error is not None]
        return {
            "requests": len(chosen),
            "errors": len(errors),
            "throughput_rps": len(chosen) / elapsed_s if elapsed_s > 0 else 0.0,
            "latency_ms": _latency_ms([s.latency_s for s in chosen if s.error is None]),
        }

    kinds = sorted({s.kind for s in samples})
    overall = part(samples)
    overall["errors"] += len(left_out)
    error_kinds = Counter(s.error for s in samples if s.error is not None)
    error_kinds.update(e.error for e in left_out)
    return {
        "url": base_url,
        "clients": settings.clients,
        "duration_s": settings.duration_s,
        "elapsed_s": elapsed_s,
        "mode": settings.mode,
        "k": settings.k,
        "queries": settings.queries,
        "index": {key: info.get(key) for key in ("count", "embedding_dim", "index_kind", "backend", "model")},
        **overall,
        "error_kinds": dict(error_kinds),
        "setup_errors": [{"path": e.path, "error": e.error} for e in left_out],
        "by_kind": {kind: part([s for s in samples if s.kind == kind]) for kind in kinds},
        "cpu_count": os.cpu_count(),
    }


def format_load_test_report(report: dict[str, Any]) -> str:
    """The report as a few lines of text."""

    def latency(part: dict[str, Any]) -> str:
        values = part["latency_ms"]
        if values["p50"] is None:
            return "no successful request"
        return "  ".join(f"{name} {values[name]:.1f} ms" for name in ("p50", "p90", "p99", "max"))

    index = report["index"]
    index_kind = f"{index['index_kind']} {index.get('backend') or 'faiss'}"
    lines = [
        f"load test: {report['clients']} clients x {report['duration_s']:g} s against {report['url']} "
        f"({index['count']} images, {index_kind} index), {report['mode']} queries, k={report['k']}",
        f"requests {report['requests']}  errors {report['errors']}  throughput {report['throughput_rps']:.1f} req/s "
        f"(over {report['elapsed_s']:.1f} s)",
        f"latency  {latency(report)}",
    ]
    for kind, part in report["by_kind"].items():
        lines.append(
            f"  {kind:<6}  requests {part['requests']}  errors {part['errors']}  "
            f"{part['throughput_rps']:.1f} req/s  {latency(part)}"
        )
    setup_errors = report.get("setup_errors", [])
    if setup_errors:
        shown = ", ".join(f"{e['path']} ({e['error']})" for e in setup_errors[:3])
        lines.append(f"gallery images that could not be queries: {len(setup_errors)}, e.g. {shown}")
    if report["error_kinds"]:
        lines.append("errors: " + ", ".join(f"{kind} x{count}" for kind, count in report["error_kinds"].items()))
    return "\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# The server runs as its own process, as `scripts/serve.py` runs it, so that clients and server do not share a GIL.
SERVE_CODE = "import sys; from metricsearch.cli.search import main_serve; sys.exit(main_serve(sys.argv[1:]))"


@contextlib.contextmanager
def start_server(serve_args: Sequence[str], port: int | None = None) -> Iterator[str]:
    """Starts ``scripts/serve.py SERVE_ARGS`` on 127.0.0.1 in a child process; yields its URL once it answers.

    The server is stopped (SIGTERM, then SIGKILL) when the block ends.

    Raises:
        LoadTestError: the server exits or does not answer within :data:`SERVER_START_TIMEOUT_S`; the message
            ends with its last output.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE_CODE, *serve_args, "host=127.0.0.1", f"port={port}"],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            _wait_until_serving(process, url, output)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_serving(process: subprocess.Popen, url: str, output: Any) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output.seek(0)
            tail = output.read()[-2000:]
            raise LoadTestError(f"the server exited with status {process.returncode} before serving:\n{tail}")
        try:
            if httpx.get(f"{url}/api/info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise LoadTestError(f"the server at {url} did not answer within {SERVER_START_TIMEOUT_S:.0f} s")


def write_load_test_report(report: dict[str, Any], path: str | Path) -> Path:
    """Writes the report as JSON, atomically."""
    path = Path(path).expanduser().resolve()
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    return path
