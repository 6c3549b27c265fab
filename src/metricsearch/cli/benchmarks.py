"""Command lines of the measurements: ``scripts/benchmark.py``, ``bench_search.py`` and ``load_test.py``.

The work is in :mod:`metricsearch.benchmarks`; these parse ``key=value`` arguments (:mod:`metricsearch.cli.args`),
call it and print its report.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metricsearch.benchmarks import SECTIONS
from metricsearch.cli.args import Arguments, Command, Option, UsageError, run_command
from metricsearch.cli.search import (
    GALLERY_MOVED,
    SEARCH_ERRORS,
    index_choice,
    index_options,
    model_choice,
    model_options,
)
from metricsearch.inference.model_choice import given_choice
from metricsearch.search.errors import MAX_K

# --- benchmark: the speed-and-scale report ---

BENCHMARK = Command(
    name="benchmark",
    summary=(
        "Measure speed and scale on this machine: training throughput, Lightning's overhead and the evaluation "
        "against other retrieval-metric libraries; the GPU sections when CUDA is available. Writes benchmark.json "
        "and benchmark.md to out= (see metricsearch.benchmarks.speed)."
    ),
    options={
        "out": Option("results/benchmark", "report folder"),
        "quick": Option(False, "smaller sizes: a few minutes, SOP targets not measured"),
        "sections": Option(",".join(SECTIONS), f"comma-separated subset of {', '.join(SECTIONS)}"),
        "data_dir": Option(None, "synthetic training data (default: data/benchmark)"),
    },
    # The report's own progress lines are printed; log messages of the runs it measures would drown them.
    log_level=logging.WARNING,
)


def _benchmark(args: Arguments) -> None:
    sections = [s.strip() for s in (args["sections"] or "").split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise UsageError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from metricsearch.benchmarks.speed import run_speed_benchmark

    out = Path(args["out"])
    data_dir = Path(args["data_dir"]) if args["data_dir"] else None
    progress = functools.partial(print, flush=True)
    run_speed_benchmark(out, sections=sections, quick=args["quick"], data_dir=data_dir, log=progress)
    print(f"report: {out / 'benchmark.md'}")


def main_benchmark(argv: Sequence[str] | None = None) -> int:
    """``scripts/benchmark.py``."""
    return run_command(BENCHMARK, argv, _benchmark)


# --- bench_search: exact vs approximate faiss indexes ---

ANN_KEYS = ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")


def command_line(command: Command, args: Arguments) -> str:
    """The command that gives ``args`` again, naming only the options that differ from their defaults."""

    def spelled(value: object) -> str:
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    changed = [f"{key}={spelled(args[key])}" for key, option in command.options.items() if args[key] != option.default]
    return " ".join([f"python scripts/{command.name}.py", *changed])


def provenance(command: Command, args: Arguments) -> dict[str, Any]:
    """What a report records of where it came from: the machine, read before the measurement starts (its load
    average included), and the command that gives the report again."""
    from metricsearch.benchmarks.speed import machine_info

    return {"machine": machine_info(), "command": command_line(command, args)}


BENCH_SEARCH = Command(
    name="bench_search",
    summary=(
        "Benchmark exact vs IVF vs HNSW faiss indexes on a clustered synthetic gallery: build speed, single-query "
        "latency p50/p99, batched throughput, recall@k against exact. Prints a table and writes JSON. With ckpt= "
        "or backbone=, also measures that model's embedding throughput (end-to-end images/s)."
    ),
    options={
        "n": Option(100_000, "gallery size"),
        "dim": Option(128, "embedding size"),
        "queries": Option(1000, "number of queries"),
        "k": Option(10, "neighbours per query (recall@k)"),
        "clusters": Option(1000, "class centres the gallery is drawn around"),
        "spread": Option(1.5, "distance of the points from their centre (before re-normalising)"),
        "nlist": Option(1024, "IVF cells"),
        "nprobe": Option(16, "IVF cells visited per query"),
        "hnsw_m": Option(32, "HNSW neighbours per node"),
        "ef_construction": Option(80, "HNSW build candidate list"),
        "ef_search": Option(64, "HNSW query candidate list"),
        "query_threads": Option(1, "faiss threads for single-query latency"),
        "seed": Option(0, "random seed"),
        **model_options("ckpt", "backbone"),
        "out": Option("outputs/bench/search.json", "JSON results file"),
        "backends": Option(
            "faiss:flat,faiss:ivf,faiss:hnsw,milvus:flat",
            "then compare backends (BACKEND:KIND, comma-separated; none: skip): build, add 1k, QPS at 1 and 16 "
            "clients, recall, peak memory, each in its own process",
        ),
        "qps_seconds": Option(10.0, "seconds of each QPS measurement"),
        "latency": Option(True, "first the faiss latency table (false: only the backend comparison)"),
    },
)


def _bench_search(args: Arguments) -> None:
    from metricsearch.benchmarks.search import format_search_table, run_search_benchmark
    from metricsearch.inference.model_loading import load_embedder
    from metricsearch.search.index import IndexSpec
    from metricsearch.utils.atomic_io import atomic_write_text

    ann = {key: args[key] for key in ANN_KEYS}
    choice = given_choice(model_choice(args))
    # The gallery and queries both benchmarks draw: the same ones, so their tables compare.
    data = {"n": args["n"], "dim": args["dim"], "num_queries": args["queries"], "k": args["k"]}
    data.update(clusters=args["clusters"], spread=args["spread"], seed=args["seed"])
    origin = provenance(BENCH_SEARCH, args)
    result: dict = {}
    if args["latency"]:
        result = run_search_benchmark(
            **data,
            specs=[IndexSpec("flat"), IndexSpec("ivf", **ann), IndexSpec("hnsw", **ann)],
            embedder=load_embedder(**choice) if choice else None,
            query_threads=args["query_threads"],
        )
        print(format_search_table(result))
    elif not args["backends"]:
        raise UsageError("latency=false and backends=none leave nothing to measure")
    if args["backends"]:
        from metricsearch.analysis.docs_tables import format_backend_table
        from metricsearch.benchmarks.search_backends import run_backend_benchmark

        pairs = [tuple(item.strip().split(":", 1)) for item in args["backends"].split(",") if item.strip()]
        if any(len(p) != 2 or p[0] not in ("faiss", "milvus") or p[1] not in ("flat", "ivf", "hnsw") for p in pairs):
            raise UsageError(
                f"backends={args['backends']} should list BACKEND:KIND (faiss or milvus : flat, ivf, hnsw)"
            )
        if pairs[0] != ("faiss", "flat"):
            pairs.insert(0, ("faiss", "flat"))  # the exact reference of recall
        result["backends"] = run_backend_benchmark(
            **data,
            seconds=args["qps_seconds"],
            backends=tuple(pairs),
        )
        print(format_backend_table(result["backends"]))
    result.update(origin)
    out = Path(args["out"])
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"results: {out.resolve()}")


def main_bench_search(argv: Sequence[str] | None = None) -> int:
    """``scripts/bench_search.py``."""
    return run_command(BENCH_SEARCH, argv, _bench_search, SEARCH_ERRORS)


# --- bench_postprocess: what re-ranking and query expansion change ---

BENCH_POSTPROCESS = Command(
    name="bench_postprocess",
    summary=(
        "Measure alpha-QE, DBA and k-reciprocal re-ranking by the exact metrics: on a run's test embeddings "
        "(embeddings=RUN/test_embeddings.npz, written with save_test_embeddings=true) and on a synthetic "
        "query/gallery set of In-Shop's test size. Writes postprocess.json/.csv/.md/.png to out=."
    ),
    options={
        "embeddings": Option(None, "a run's test_embeddings.npz (none: only the synthetic set)"),
        "inshop": Option(True, "also measure the In-Shop-size synthetic query/gallery set"),
        "out": Option("outputs/bench/postprocess", "report folder (results/postprocess holds the committed one)"),
    },
    log_level=logging.WARNING,
)


def _bench_postprocess(args: Arguments) -> None:
    from metricsearch.analysis.files import save_figure, write_csv
    from metricsearch.benchmarks.postprocess import (
        format_postprocess_table,
        plot_postprocess,
        run_postprocess_benchmark,
    )
    from metricsearch.utils.atomic_io import atomic_write_text

    embeddings = Path(args["embeddings"]) if args["embeddings"] else None
    if embeddings is not None and not embeddings.is_file():
        raise UsageError(f"embeddings={embeddings} is not a file: train with save_test_embeddings=true first")
    if embeddings is None and not args["inshop"]:
        raise UsageError("nothing to measure: give embeddings= or leave inshop=true")
    from metricsearch.benchmarks.speed import machine_info

    machine = machine_info()
    rows = run_postprocess_benchmark(embeddings, inshop=args["inshop"], log=functools.partial(print, flush=True))
    out = Path(args["out"])
    given = " ".join(f"{key}={args[key]}" for key in ("embeddings", "inshop"))
    command = f"python scripts/bench_postprocess.py {given}"
    report = {"machine": machine, "command": command, "rows": rows}
    atomic_write_text(out / "postprocess.json", json.dumps(report, indent=1) + "\n")
    write_csv(out / "postprocess.csv", rows)
    table = format_postprocess_table(rows)
    atomic_write_text(out / "postprocess.md", table)
    save_figure(plot_postprocess(rows), out / "postprocess.png")
    print(table)
    print(f"report: {out.resolve()}")


def main_bench_postprocess(argv: Sequence[str] | None = None) -> int:
    """``scripts/bench_postprocess.py``."""
    return run_command(BENCH_POSTPROCESS, argv, _bench_postprocess)


# --- load_test: concurrent clients against the search server ---


LOAD_TEST = Command(
    name="load_test",
    summary=(
        "A bounded load test of the search server on loopback: clients= concurrent clients send searches back to "
        "back for duration= seconds (uploads of gallery images, gallery-path queries, or both alternating), every "
        "answer checked against the one given alone. Prints requests, errors, throughput and p50/p99 latency. "
        "With index= it starts scripts/serve.py itself (and stops it); with url= it tests a running server. "
        "Exit status 1 when any request failed."
    ),
    options={
        "index": Option(None, "the index folder to serve (the server is started on a free loopback port)"),
        **index_options(),
        "url": Option(None, "or a running server, e.g. http://127.0.0.1:8000"),
        "clients": Option(16, "concurrent clients (at most 256)"),
        "duration": Option(20.0, "seconds during which new requests start (at most 600)"),
        "mode": Option("mixed", "upload (decode + embed + search), path (stored embedding, search only) or mixed"),
        "k": Option(10, f"results per search (1 to {MAX_K})"),
        "queries": Option(32, "distinct gallery images used as queries"),
        "timeout": Option(30.0, "seconds before one request counts as failed"),
        "out": Option(None, "also write the report as JSON to this file"),
        **model_options(),
        "gallery": Option(None, f"{GALLERY_MOVED} (with index=)"),
        "json": Option(False, "print the report as JSON instead of text"),
    },
)


def _load_test(args: Arguments) -> int:
    from metricsearch.benchmarks.load_test import (
        LoadTestSettings,
        format_load_test_report,
        run_load_test,
        start_server,
        write_load_test_report,
    )

    if bool(args["index"]) == bool(args["url"]):
        raise UsageError("load_test needs exactly one of index= (start a server) or url= (test a running one)")
    if args["url"] and (args["index.backend"] or args["index.uri"]):
        raise UsageError("index.backend= and index.uri= go with index= (the server this test starts), not url=")
    settings = LoadTestSettings(
        clients=args["clients"],
        duration_s=args["duration"],
        mode=args["mode"],
        k=args["k"],
        queries=args["queries"],
        timeout_s=args["timeout"],
    )
    origin = provenance(LOAD_TEST, args)
    if args["url"]:
        report = run_load_test(args["url"].rstrip("/"), settings)
    else:
        from metricsearch.search.backends import check_index_choice

        check_index_choice(args["index"], **index_choice(args))  # before a server is started for nothing
        server = {
            **given_choice(model_choice(args)),
            "gallery": args["gallery"],
            "index.backend": args["index.backend"],
            "index.uri": args["index.uri"],
        }
        serve_args = [f"index={args['index']}", *(f"{key}={value}" for key, value in server.items() if value)]
        print(f"starting the server for index={args['index']} ...", file=sys.stderr)
        with start_server(serve_args) as url:
            report = run_load_test(url, settings)
    report.update(origin)
    print(json.dumps(report, indent=2) if args["json"] else format_load_test_report(report))
    if args["out"]:
        print(f"report: {write_load_test_report(report, args['out'])}", file=sys.stderr)
    return 0 if report["errors"] == 0 else 1


def main_load_test(argv: Sequence[str] | None = None) -> int:
    """``scripts/load_test.py``."""
    return run_command(LOAD_TEST, argv, _load_test, SEARCH_ERRORS)
