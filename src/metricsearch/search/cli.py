"""Command lines of the search scripts: Hydra-style ``key=value`` arguments, ``--json`` / ``--help`` flags.

Each ``scripts/*.py`` calls one ``main_*`` function here with ``sys.argv[1:]``. The arguments follow the
shape of ``train.py``'s overrides (``ckpt=PATH k=5``) without a config tree to compose: every command has a
handful of typed options, an unknown key is an error that lists the valid ones, and errors the user can fix
(a missing file, a model that did not build the index) are printed as one line without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metricsearch.data.io import ImageLoadError, atomic_write_text
from metricsearch.search.errors import MAX_K, SearchError, check_k

log = logging.getLogger(__name__)

MODEL_OPTIONS = {
    "ckpt": (None, "a training checkpoint (.ckpt; an .onnx file works too)"),
    "model": (None, "an ONNX export (scripts/export.py)"),
    "backbone": (None, "a pretrained backbone used without training, e.g. efficientnet_lite0_imagenet"),
}
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class UsageError(SearchError):
    """The command line is malformed."""


@dataclass
class Command:
    """A script's options: ``options`` maps key -> (default, help); ``flags`` maps ``--flag`` -> help."""

    name: str
    summary: str
    options: dict[str, tuple[Any, str]]
    flags: dict[str, str]
    required: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def usage(self) -> str:
        lines = [f"usage: python scripts/{self.name}.py key=value ... [flags]", "", self.summary, "", "options:"]
        for key, (default, text) in self.options.items():
            shown = "(required)" if key in self.required else f"(default: {default})"
            lines.append(f"  {key + '=':<20} {text} {shown}")
        for prefix in self.prefixes:
            lines.append(f"  {prefix + 'KEY=VALUE':<20} passed on to the {prefix.rstrip('.')} config")
        for flag, text in self.flags.items():
            lines.append(f"  {flag:<20} {text}")
        lines.append(f"  {'--help':<20} show this message")
        return "\n".join(lines)

    def parse(self, argv: Sequence[str]) -> tuple[dict[str, Any], set[str], dict[str, str]]:
        """(option values, flags given, prefixed pass-through overrides); raises UsageError."""
        values = {key: default for key, (default, _) in self.options.items()}
        flags: set[str] = set()
        extra: dict[str, str] = {}
        for arg in argv:
            if arg.startswith("--"):
                if arg not in self.flags:
                    raise UsageError(f"unknown flag {arg}; valid: {', '.join([*self.flags, '--help']) or 'none'}")
                flags.add(arg)
                continue
            key, sep, raw = arg.partition("=")
            if not sep:
                raise UsageError(f"arguments are key=value, got {arg!r}")
            if any(key.startswith(p) for p in self.prefixes):
                extra[key] = raw
                continue
            if key not in self.options:
                raise UsageError(f"unknown option {key!r} for {self.name}; valid: {', '.join(self.options)}")
            values[key] = _convert(key, raw, self.options[key][0])
        missing = [key for key in self.required if values.get(key) in (None, "")]
        if missing:
            raise UsageError(f"{self.name} needs {', '.join(k + '=' for k in missing)}")
        return values, flags, extra


def _convert(key: str, raw: str, default: Any) -> Any:
    """``raw`` as the type of ``default`` (bool, int, float or str); ``null`` / ``none`` give None."""
    if raw.strip().lower() in ("null", "none", ""):
        return None
    try:
        if isinstance(default, bool):
            word = raw.strip().lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError(raw)
            return word in TRUE_WORDS
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as err:
        raise UsageError(f"{key}={raw} is not a valid {type(default).__name__}") from err
    return raw


def run_command(command: Command, argv: Sequence[str], body: Callable[[dict, set, dict], int | None]) -> int:
    """Parses ``argv`` and runs ``body``; user errors become one line on stderr and exit status 2."""
    if "--help" in argv or "-h" in argv:
        print(command.usage())
        return 0
    # The project's own progress messages; third-party INFO chatter (faiss's loader, ...) stays hidden.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("metricsearch").setLevel(logging.INFO)
    try:
        values, flags, extra = command.parse(argv)
        return body(values, flags, extra) or 0
    except (SearchError, ImageLoadError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, UsageError):
            print(f"(python scripts/{command.name}.py --help lists the options)", file=sys.stderr)
        return 2


def _model_args(values: dict[str, Any]) -> dict[str, Any]:
    return {key: values[key] for key in MODEL_OPTIONS}


# --- build_index ---

BUILD_INDEX = Command(
    name="build_index",
    summary=(
        "Embed every image under gallery= and save a faiss index to out=. With add=true, embed only the images "
        "the index does not hold yet. trainer=ddp (plus trainer.devices=N, trainer.num_nodes=M) shards the "
        "embedding across processes, GPUs or nodes."
    ),
    options={
        **MODEL_OPTIONS,
        "gallery": (None, "the gallery folder (labels: each image's folder name)"),
        "out": (None, "the index folder to write"),
        "kind": ("flat", "faiss index: flat (exact), ivf or hnsw (approximate, for large galleries)"),
        "nlist": (1024, "IVF cells (lowered on small galleries)"),
        "nprobe": (16, "IVF cells visited per query"),
        "hnsw_m": (32, "HNSW neighbours per node"),
        "ef_construction": (80, "HNSW build candidate list"),
        "ef_search": (64, "HNSW query candidate list"),
        "batch_size": (64, "images per batch and process"),
        "num_workers": (2, "image-decoding processes per rank"),
        "trainer": ("cpu", "a conf/trainer option: cpu, gpu, ddp, default"),
        "add": (False, "add the gallery's new images to the existing index in out="),
        "overwrite": (False, "replace an existing index in out="),
    },
    flags={},
    required=("out",),
    prefixes=("trainer.",),
)


def make_configured_trainer(name: str, overrides: dict[str, str], output_dir: Path) -> Any:
    """A prediction trainer from the ``conf/trainer/NAME.yaml`` option and ``trainer.KEY=VALUE`` overrides.

    The option is composed within the training config (so ``trainer=ddp`` means what it means for
    ``train.py``) and instantiated with the settings every embedding run needs on top.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    from metricsearch.search.embedding import predict_trainer_settings
    from metricsearch.utils.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    args = [f"trainer={name}", f"paths.output_dir={output_dir}", *(f"{k}={v}" for k, v in overrides.items())]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=args)
    except HydraException as err:
        raise UsageError(f"trainer options {args}: {err}") from err
    finally:
        GlobalHydra.instance().clear()
    return instantiate(cfg.trainer, **predict_trainer_settings())


def _build_index_body(values: dict[str, Any], flags: set[str], extra: dict[str, str]) -> int:
    from metricsearch.search.embedder import load_embedder
    from metricsearch.search.index import IndexSpec
    from metricsearch.search.pipeline import add_to_index, build_index

    out = Path(values["out"]).expanduser().resolve()
    trainer = make_configured_trainer(values["trainer"], extra, out)
    common = {"trainer": trainer, "batch_size": values["batch_size"], "num_workers": values["num_workers"]}
    given_model = any(values[key] for key in MODEL_OPTIONS)
    if values["add"]:
        embedder = load_embedder(**_model_args(values)) if given_model else None
        index = add_to_index(out, embedder=embedder, gallery=values["gallery"], **common)
    else:
        if not values["gallery"]:
            raise UsageError("build_index needs gallery= (or add=true to grow an existing index)")
        spec = IndexSpec(
            **{k: values[k] for k in ("kind", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")}
        )
        embedder = load_embedder(**_model_args(values))
        index = build_index(embedder, values["gallery"], out, spec, overwrite=values["overwrite"], **common)
    if index is not None:  # rank 0 only
        labelled = sum(label is not None for label in index.labels)
        print(
            f"index {out}: {len(index)} images ({labelled} labelled), {index.embedding_dim}-d, "
            f"{index.index_params['kind']} index, model fingerprint {index.model['fingerprint'][:12]}"
        )
    return 0


def main_build_index(argv: Sequence[str]) -> int:
    """``scripts/build_index.py``."""
    return run_command(BUILD_INDEX, argv, _build_index_body)


# --- search ---

SEARCH = Command(
    name="search",
    summary="Print the k gallery images most similar to query= (best first, with scores) and draw them as a PNG.",
    options={
        "index": (None, "the index folder"),
        "query": (None, "the query image file"),
        "k": (10, f"number of results (1 to {MAX_K})"),
        **MODEL_OPTIONS,
        "gallery": (None, "where the gallery images are now, if they moved since indexing"),
        "grid": ("", "the PNG to write (default outputs/search/<query>_top<k>.png; none: no picture)"),
    },
    flags={"--json": "print the results as JSON (for machines)"},
    required=("index", "query"),
)


def _search_body(values: dict[str, Any], flags: set[str], extra: dict[str, str]) -> int:
    from metricsearch.data.io import load_rgb_image
    from metricsearch.search.grid import gallery_loader, save_result_grid
    from metricsearch.search.pipeline import open_index

    check_k(values["k"])  # the server's rule, checked before anything is loaded
    index, embedder = open_index(values["index"], gallery=values["gallery"], **_model_args(values))
    query_path = Path(values["query"]).expanduser().resolve()
    query = load_rgb_image(query_path)
    hits = index.search(embedder.embed_images([query]), values["k"])[0]
    grid_path = None
    if values["grid"] is not None:
        default = Path("outputs") / "search" / f"{query_path.stem}_top{values['k']}.png"
        grid_path = Path(values["grid"] or default).expanduser().resolve()
        save_result_grid(
            query,
            hits,
            gallery_loader(index.gallery_root),
            grid_path,
            query_label=_label_if_in_gallery(index, query_path),
            query_caption=query_path.name,
            title=f"top {len(hits)} of {len(index)} images, {embedder.describe()}",
        )
    if "--json" in flags:
        document = {
            "query": str(query_path),
            "index": str(Path(values["index"]).expanduser().resolve()),
            "model": embedder.source | {"fingerprint": embedder.fingerprint},
            "k": values["k"],
            "grid": str(grid_path) if grid_path else None,
            "results": [
                {"rank": h.rank, "score": h.score, "path": h.path, "label": h.label, "file": str(index.resolve(h.path))}
                for h in hits
            ],
        }
        print(json.dumps(document, indent=2))
    else:
        print(f"query {query_path} -> top {len(hits)} of {len(index)} ({embedder.describe()})")
        for h in hits:
            label = "" if h.label is None else f"  [{h.label}]"
            print(f"{h.rank:>3}  {h.score:.4f}  {index.resolve(h.path)}{label}")
        if grid_path:
            print(f"grid: {grid_path}")
    return 0


def _label_if_in_gallery(index: Any, query_path: Path) -> str | None:
    """The query's label when the query is itself a gallery file (so the grid can mark same-class results)."""
    try:
        relative = query_path.relative_to(Path(index.gallery_root).resolve()).as_posix()
    except ValueError:
        return None
    return index.labels[index.position_of(relative)] if relative in index else None


def main_search(argv: Sequence[str]) -> int:
    """``scripts/search.py``."""
    return run_command(SEARCH, argv, _search_body)


# --- serve ---

SERVE = Command(
    name="serve",
    summary="Serve a search page (upload an image or click a gallery image) and a JSON API (POST /api/search).",
    options={
        "index": (None, "the index folder"),
        "host": ("127.0.0.1", "address to bind (anything but loopback exposes the gallery to the network)"),
        "port": (8000, "TCP port"),
        "k": (10, f"default number of results (1 to {MAX_K})"),
        **MODEL_OPTIONS,
        "gallery": (None, "where the gallery images are now, if they moved since indexing"),
        "max_upload_mb": (10.0, "largest accepted upload, MiB"),
        "max_megapixels": (40.0, "largest accepted image, megapixels (decompression-bomb guard)"),
        "max_aspect_ratio": (20.0, "most elongated accepted image, long side / short side"),
        "max_large_decodes": (2, "large images (4 megapixels and more) decoded at once; others wait"),
    },
    flags={},
    required=("index",),
)


def _serve_body(values: dict[str, Any], flags: set[str], extra: dict[str, str]) -> int:
    from metricsearch.search.server import ServerSettings, create_app, serve

    settings = ServerSettings(
        default_k=values["k"],
        max_upload_bytes=int(values["max_upload_mb"] * 1024 * 1024),
        max_pixels=int(values["max_megapixels"] * 1e6),
        max_aspect_ratio=values["max_aspect_ratio"],
        max_large_decodes=values["max_large_decodes"],
    )
    app = create_app(values["index"], gallery=values["gallery"], settings=settings, **_model_args(values))
    print(f"open http://{values['host']}:{values['port']}/ (Ctrl+C stops the server)")
    serve(app, host=values["host"], port=values["port"])
    return 0


def main_serve(argv: Sequence[str]) -> int:
    """``scripts/serve.py``."""
    return run_command(SERVE, argv, _serve_body)


# --- load test ---

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
        "index": (None, "the index folder to serve (the server is started on a free loopback port)"),
        "url": (None, "or a running server, e.g. http://127.0.0.1:8000"),
        "clients": (16, "concurrent clients (at most 256)"),
        "duration": (20.0, "seconds during which new requests start (at most 600)"),
        "mode": ("mixed", "upload (decode + embed + search), path (stored embedding, search only) or mixed"),
        "k": (10, f"results per search (1 to {MAX_K})"),
        "queries": (32, "distinct gallery images used as queries"),
        "timeout": (30.0, "seconds before one request counts as failed"),
        "out": (None, "also write the report as JSON to this file"),
        **MODEL_OPTIONS,
        "gallery": (None, "where the gallery images are now, if they moved since indexing (with index=)"),
    },
    flags={"--json": "print the report as JSON instead of text"},
)


def _load_test_body(values: dict[str, Any], flags: set[str], extra: dict[str, str]) -> int:
    from metricsearch.benchmarks.load_test import (
        LoadTestSettings,
        format_load_test_report,
        run_load_test,
        start_server,
        write_load_test_report,
    )

    if bool(values["index"]) == bool(values["url"]):
        raise UsageError("load_test needs exactly one of index= (start a server) or url= (test a running one)")
    settings = LoadTestSettings(
        clients=values["clients"],
        duration_s=values["duration"],
        mode=values["mode"],
        k=values["k"],
        queries=values["queries"],
        timeout_s=values["timeout"],
    )
    if values["url"]:
        report = run_load_test(values["url"].rstrip("/"), settings)
    else:
        serve_args = [f"index={values['index']}"]
        serve_args += [f"{key}={values[key]}" for key in (*MODEL_OPTIONS, "gallery") if values[key]]
        print(f"starting the server for index={values['index']} ...", file=sys.stderr)
        with start_server(serve_args) as url:
            report = run_load_test(url, settings)
    print(json.dumps(report, indent=2) if "--json" in flags else format_load_test_report(report))
    if values["out"]:
        print(f"report: {write_load_test_report(report, values['out'])}", file=sys.stderr)
    return 0 if report["errors"] == 0 else 1


def main_load_test(argv: Sequence[str]) -> int:
    """``scripts/load_test.py``."""
    return run_command(LOAD_TEST, argv, _load_test_body)


# --- export ---

EXPORT = Command(
    name="export",
    summary="Export the embedding model (preprocessed images in, embeddings out) with its preprocessing metadata.",
    options={
        "ckpt": (None, "a training checkpoint"),
        "backbone": (None, "or a pretrained backbone used without training, e.g. efficientnet_lite0_imagenet"),
        "format": ("onnx", "export format (onnx)"),
        "out": (None, "the file to write (default: the checkpoint's path with .onnx, or outputs/export/NAME.onnx)"),
        "opset": (17, "ONNX opset"),
        "check": (True, "compare onnxruntime with PyTorch on a random batch after exporting"),
    },
    flags={},
)


def _export_body(values: dict[str, Any], flags: set[str], extra: dict[str, str]) -> int:
    import torch

    from metricsearch.search.embedder import OnnxEmbedder, load_embedder
    from metricsearch.search.export import check_parity, export_onnx

    if values["format"] != "onnx":
        raise UsageError(f"format={values['format']} is not supported; the only format is onnx")
    embedder = load_embedder(ckpt=values["ckpt"], backbone=values["backbone"])
    if values["out"]:
        out = Path(values["out"])
    elif values["ckpt"]:
        out = Path(values["ckpt"]).with_suffix(".onnx")
    else:
        out = Path("outputs") / "export" / f"{values['backbone']}.onnx"
    path = export_onnx(embedder, out, opset=values["opset"])
    print(f"exported {embedder.describe()} to {path}")
    if values["check"]:
        size = embedder.preprocessing["image_size"]
        images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        difference = check_parity(embedder, OnnxEmbedder(path), images)
        print(f"onnxruntime vs PyTorch on a random batch: max |difference| = {difference:.2e}")
        if difference > 1e-4:
            raise SearchError(f"the ONNX model differs from PyTorch by {difference:.2e} (> 1e-4)")
    return 0


def main_export(argv: Sequence[str]) -> int:
    """``scripts/export.py``."""
    return run_command(EXPORT, argv, _export_body)


# --- benchmark ---

BENCH = Command(
    name="bench_search",
    summary=(
        "Benchmark exact vs IVF vs HNSW faiss indexes on a clustered synthetic gallery: build speed, single-query "
        "latency p50/p99, batched throughput, recall@k against exact. Prints a table and writes JSON."
    ),
    options={
        "n": (100_000, "gallery size"),
        "dim": (128, "embedding size"),
        "queries": (1000, "number of queries"),
        "k": (10, "neighbours per query (recall@k)"),
        "clusters": (1000, "class centres the gallery is drawn around"),
        "spread": (1.5, "distance of the points from their centre (before re-normalising)"),
        "nlist": (1024, "IVF cells"),
        "nprobe": (16, "IVF cells visited per query"),
        "hnsw_m": (32, "HNSW neighbours per node"),
        "ef_construction": (80, "HNSW build candidate list"),
        "ef_search": (64, "HNSW query candidate list"),
        "query_threads": (1, "faiss threads for single-query latency"),
        "seed": (0, "random seed"),
        "ckpt": (None, "also measure this model's embedding throughput (end-to-end images/s)"),
        "backbone": (None, "or a pretrained backbone's"),
        "out": ("outputs/bench/search.json", "JSON results file"),
    },
    flags={},
)


def _bench_body(values: dict[str, Any], flags: set[str], extra: dict[str, str]) -> int:
    from metricsearch.benchmarks.search import format_search_table, run_search_benchmark
    from metricsearch.search.embedder import load_embedder
    from metricsearch.search.index import IndexSpec

    ann = {k: values[k] for k in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")}
    specs = [IndexSpec("flat"), IndexSpec("ivf", **ann), IndexSpec("hnsw", **ann)]
    embedder = (
        load_embedder(ckpt=values["ckpt"], backbone=values["backbone"])
        if (values["ckpt"] or values["backbone"])
        else None
    )
    result = run_search_benchmark(
        n=values["n"],
        dim=values["dim"],
        num_queries=values["queries"],
        k=values["k"],
        clusters=values["clusters"],
        spread=values["spread"],
        specs=specs,
        seed=values["seed"],
        embedder=embedder,
        query_threads=values["query_threads"],
    )
    print(format_search_table(result))
    out = Path(values["out"])
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"results: {out.resolve()}")
    return 0


def main_bench(argv: Sequence[str]) -> int:
    """``scripts/bench_search.py``."""
    return run_command(BENCH, argv, _bench_body)


# --- demo ---

DEMO = Command(
    name="demo",
    summary=(
        "Train (or reuse) a short default run, index its unseen test classes, search with a held-out image, "
        "write the result grid, and check that the ONNX export ranks identically."
    ),
    options={
        "out": ("outputs/demo", "the demo's run folder (delete it to retrain)"),
        "k": (8, "results to show"),
        "max_epochs": (8, "training epochs"),
        "max_time": ("00:00:05:00", "training wall-clock cap (DD:HH:MM:SS)"),
    },
    flags={},
    prefixes=("train.",),
)


def _demo_body(values: dict[str, Any], flags: set[str], extra: dict[str, str]) -> int:
    from metricsearch.search.demo import run_demo

    train_args = [f"{key.removeprefix('train.')}={value}" for key, value in extra.items()]
    run_demo(values["out"], values["k"], values["max_epochs"], values["max_time"], train_args)
    return 0


def main_demo(argv: Sequence[str]) -> int:
    """``scripts/demo.py``."""
    return run_command(DEMO, argv, _demo_body)
