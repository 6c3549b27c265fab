"""Command lines of the search tools: ``scripts/build_index.py``, ``search.py``, ``serve.py`` and ``export.py``.

Each ``main_*`` parses its ``key=value`` arguments (:mod:`metricsearch.cli.args`) and calls the work in
:mod:`metricsearch.pipelines.index`, :mod:`metricsearch.pipelines.export` or :mod:`metricsearch.search.server`.
Every command that takes a model takes the same ``ckpt=`` / ``model=`` / ``backbone=`` options
(:mod:`metricsearch.inference.model_choice`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from metricsearch.cli.args import Arguments, Command, Option, PassedOn, UsageError, run_command
from metricsearch.data.io import MAX_ASPECT_RATIO, ImageLoadError
from metricsearch.inference.errors import InferenceError
from metricsearch.inference.model_choice import MODEL_CHOICE_HELP, ModelChoice, given_choice
from metricsearch.search.errors import DEFAULT_SHORTLIST, MAX_K, MAX_SHORTLIST, SearchError, check_k
from metricsearch.utils.config import ConfigError

if TYPE_CHECKING:  # imported where used: --help must not load faiss and torch
    from metricsearch.search.rerank import SearchPostprocess

# What the search commands report as one line, exit status 2: their own errors, unreadable images, missing files,
# trainer options that do not compose.
SEARCH_ERRORS = {SearchError: 2, InferenceError: 2, ImageLoadError: 2, FileNotFoundError: 2, ConfigError: 2}
GALLERY_MOVED = "where the gallery images are now, if they moved since indexing"


def model_options(*keys: str) -> dict[str, Option]:
    """The model-choice options (all of them unless ``keys`` names some), as every command that takes a model lists
    them."""
    return {key: Option(None, MODEL_CHOICE_HELP[key]) for key in keys or MODEL_CHOICE_HELP}


def model_choice(args: Arguments) -> ModelChoice:
    """The model-choice options of a parsed command line (those the command has)."""
    return {key: args[key] for key in MODEL_CHOICE_HELP if key in args.values}  # type: ignore[return-value]


def index_options() -> dict[str, Option]:
    """``index.backend=`` / ``index.uri=`` of a command that opens an existing index: a check and an override."""
    return {
        "index.backend": Option(
            None, "faiss or milvus: refuse the index unless its folder holds this backend (none: whichever it holds)"
        ),
        "index.uri": Option(
            None, "a Milvus index: where its collection is now (Lite file or server URL), if not where it was built"
        ),
    }


def index_choice(args: Arguments) -> dict[str, str | None]:
    """``index.backend=`` / ``index.uri=`` of a parsed command line, as the index loaders take them."""
    return {"backend": args["index.backend"], "uri": args["index.uri"]}


# The parameters of the postprocess config group (conf/postprocess/*.yaml), each left unset for its default there.
POSTPROCESS_PARAMS = {
    "k": (int, "aqe, dba: gallery neighbours added to the query or to each image"),
    "alpha": (float, "aqe, dba: exponent of the similarity weights"),
    "k1": (int, "k_reciprocal: neighbourhood size"),
    "k2": (int, "k_reciprocal: neighbours of the local query expansion"),
    "lambda": (float, "k_reciprocal: weight of the original distance, 0 to 1"),
}


def postprocess_options() -> dict[str, Option]:
    """``postprocess=`` and its parameters, as the evaluation's ``postprocess`` config group names them."""
    options = {
        "postprocess": Option(
            "none", "re-ranking or query expansion: none, aqe, dba or k_reciprocal (docs/postprocess.md)"
        )
    }
    for key, (kind, text) in POSTPROCESS_PARAMS.items():
        options[f"postprocess.{key}"] = Option(None, f"{text} (none: its value in conf/postprocess/)", type=kind)
    options["postprocess.shortlist"] = Option(
        DEFAULT_SHORTLIST, f"dba, k_reciprocal: candidates re-ranked per query (1 to {MAX_SHORTLIST}; at least k are)"
    )
    return options


def postprocess_choice(args: Arguments) -> SearchPostprocess:
    """The post-processing a parsed command line asks for (checked: an error names the bad value)."""
    from metricsearch.search.rerank import SearchPostprocess

    params = {key: args[f"postprocess.{key}"] for key in POSTPROCESS_PARAMS if args[f"postprocess.{key}"] is not None}
    return SearchPostprocess.of(args["postprocess"] or "none", params, args["postprocess.shortlist"])


# --- build_index ---

INDEX_SPEC_KEYS = ("kind", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")

BUILD_INDEX = Command(
    name="build_index",
    summary=(
        "Embed every image under gallery= and save an index to out= (faiss, or index.backend=milvus). With add=true, "
        "embed only the images the index does not hold yet; remove= / remove_ids= take images out. trainer=ddp "
        "(plus trainer.devices=N, trainer.num_nodes=M) shards the embedding across processes, GPUs or nodes."
    ),
    options={
        **model_options(),
        "gallery": Option(None, "the gallery folder (labels: each image's folder name)"),
        "out": Option(None, "the index folder to write", required=True),
        "kind": Option("flat", "faiss index: flat (exact), ivf or hnsw (approximate, for large galleries)"),
        "nlist": Option(1024, "IVF cells (lowered on small galleries)"),
        "nprobe": Option(16, "IVF cells visited per query"),
        "hnsw_m": Option(32, "HNSW neighbours per node"),
        "ef_construction": Option(80, "HNSW build candidate list"),
        "ef_search": Option(64, "HNSW query candidate list"),
        "batch_size": Option(64, "images per batch and process"),
        "num_workers": Option(2, "image-decoding processes per rank"),
        "trainer": Option("cpu", "a conf/trainer option: cpu, gpu, ddp, default"),
        "add": Option(False, "add the gallery's new images to the existing index in out="),
        "remove": Option(None, "remove these images (gallery paths, comma-separated) from the index in out="),
        "remove_ids": Option(None, "remove the images of these ids (comma-separated) from the index in out="),
        "overwrite": Option(False, "replace an existing index in out="),
        "index.backend": Option(
            None,
            "where the vectors live: faiss (files in out=) or milvus (a Milvus collection); none: faiss for a new "
            "index, whichever out= holds with add= or remove= (given there, it is checked)",
        ),
        "index.uri": Option(
            None,
            "index.backend=milvus: a Milvus Lite file (default out/gallery.db) or a server URL; with add= or "
            "remove=, where the collection is now (recorded in the index)",
        ),
    },
    passed_on=PassedOn(("trainer.",), (("trainer.KEY=VALUE", "passed on to the trainer config"),)),
)


def _build_index(args: Arguments) -> None:
    from metricsearch.inference.model_loading import load_embedder
    from metricsearch.pipelines.index import add_to_index, build_index, make_configured_trainer
    from metricsearch.search.index import IndexSpec

    out = Path(args["out"]).expanduser().resolve()
    if args["remove"] or args["remove_ids"]:
        _remove(args, out)
        return
    trainer = make_configured_trainer(args["trainer"], args.overrides, out)
    common = {"trainer": trainer, "batch_size": args["batch_size"], "num_workers": args["num_workers"]}
    choice = given_choice(model_choice(args))
    if args["add"]:
        embedder = load_embedder(**choice) if choice else None
        index = add_to_index(out, embedder=embedder, gallery=args["gallery"], **index_choice(args), **common)
    else:
        if not args["gallery"]:
            raise UsageError("build_index needs gallery= (or add=true to grow an existing index)")
        spec = IndexSpec(**{key: args[key] for key in INDEX_SPEC_KEYS})
        index = build_index(
            load_embedder(**choice),
            args["gallery"],
            out,
            spec,
            overwrite=args["overwrite"],
            backend=args["index.backend"] or "faiss",
            uri=args["index.uri"],
            **common,
        )
    if index is not None:  # rank 0 only
        labelled = sum(label is not None for label in index.labels)
        where = " in Milvus" if index.backend == "milvus" else ""
        print(
            f"index {out}: {len(index)} images ({labelled} labelled), {index.embedding_dim}-d, "
            f"{index.index_params['kind']} index{where}, model fingerprint {index.model['fingerprint'][:12]}"
        )


def _remove(args: Arguments, out: Path) -> None:
    from metricsearch.pipelines.index import remove_from_index

    if args["add"] or args["overwrite"]:
        raise UsageError("remove= and remove_ids= change an index in place: they go without add=true or overwrite=true")
    paths = [p.strip() for p in (args["remove"] or "").split(",") if p.strip()]
    try:
        ids = [int(i) for i in (args["remove_ids"] or "").split(",") if i.strip()]
    except ValueError:
        raise UsageError(f"remove_ids={args['remove_ids']} should be integers separated by commas") from None
    index, removed = remove_from_index(out, paths, ids, gallery=args["gallery"], **index_choice(args))
    print(f"index {out}: removed {len(removed)} images, {len(index)} left ({index.backend} index)")


def main_build_index(argv: Sequence[str] | None = None) -> int:
    """``scripts/build_index.py``."""
    return run_command(BUILD_INDEX, argv, _build_index, SEARCH_ERRORS)


# --- search ---

SEARCH = Command(
    name="search",
    summary="Print the k gallery images most similar to query= (best first, with scores) and draw them as a PNG.",
    options={
        "index": Option(None, "the index folder", required=True),
        **index_options(),
        "query": Option(None, "the query image file", required=True),
        "k": Option(10, f"number of results (1 to {MAX_K})"),
        **model_options(),
        "gallery": Option(None, GALLERY_MOVED),
        "grid": Option("", "the PNG to write (default outputs/search/<query>_top<k>.png; none: no picture)"),
        "json": Option(False, "print the results as JSON (for machines)"),
        "label": Option(None, "only results of this class"),
        "folder": Option(None, "only results under this folder of the gallery (e.g. shoes/red)"),
        **postprocess_options(),
    },
)


def _search(args: Arguments) -> None:
    from metricsearch.pipelines.index import search_image
    from metricsearch.search.filters import SearchFilter
    from metricsearch.search.index import open_index

    k = check_k(args["k"])  # the server's rules, checked before anything is loaded
    where = SearchFilter.of(args["label"], args["folder"])
    post = postprocess_choice(args)
    index, embedder = open_index(args["index"], gallery=args["gallery"], **index_choice(args), **model_choice(args))
    query = Path(args["query"]).expanduser().resolve()
    grid = None
    if args["grid"] is not None:
        grid = Path(args["grid"] or Path("outputs") / "search" / f"{query.stem}_top{k}.png").expanduser().resolve()
    hits = search_image(index, embedder, query, k, grid=grid, where=where, post=post)
    if args["json"]:
        document = {
            "query": str(query),
            "index": str(Path(args["index"]).expanduser().resolve()),
            "model": embedder.source | {"fingerprint": embedder.fingerprint},
            "k": k,
            "postprocess": post.describe(),
            "grid": str(grid) if grid else None,
            "results": [
                {
                    "rank": h.rank,
                    "score": h.score,
                    "path": h.path,
                    "label": h.label,
                    "id": h.id,
                    "file": str(index.resolve(h.path)),
                }
                for h in hits
            ],
        }
        print(json.dumps(document, indent=2))
        return
    after = "" if post.method == "none" else f", re-ranked by {post.method}"
    print(f"query {query} -> top {len(hits)} of {len(index)} ({embedder.describe()}{after})")
    for h in hits:
        label = "" if h.label is None else f"  [{h.label}]"
        print(f"{h.rank:>3}  {h.score:.4f}  {index.resolve(h.path)}{label}")
    if grid:
        print(f"grid: {grid}")


def main_search(argv: Sequence[str] | None = None) -> int:
    """``scripts/search.py``."""
    return run_command(SEARCH, argv, _search, SEARCH_ERRORS)


# --- serve ---

SERVE = Command(
    name="serve",
    summary="Serve a search page (upload an image or click a gallery image) and a JSON API (POST /api/search).",
    options={
        "index": Option(None, "the index folder", required=True),
        **index_options(),
        "host": Option("127.0.0.1", "address to bind (anything but loopback exposes the gallery to the network)"),
        "port": Option(8000, "TCP port"),
        "k": Option(10, f"default number of results (1 to {MAX_K})"),
        **model_options(),
        "gallery": Option(None, GALLERY_MOVED),
        "max_upload_mb": Option(10.0, "largest accepted upload, MiB"),
        "max_megapixels": Option(40.0, "largest accepted image, megapixels (decompression-bomb guard)"),
        "max_aspect_ratio": Option(
            MAX_ASPECT_RATIO, f"most elongated accepted image, long side / short side (at most {MAX_ASPECT_RATIO:g})"
        ),
        "max_large_decodes": Option(2, "large images (4 megapixels and more) decoded at once; others wait"),
        **postprocess_options(),
    },
)


def _serve(args: Arguments) -> None:
    from metricsearch.search.server import ServerSettings, create_app, serve

    settings = ServerSettings(
        default_k=args["k"],
        max_upload_bytes=int(args["max_upload_mb"] * 1024 * 1024),
        max_pixels=int(args["max_megapixels"] * 1e6),
        max_aspect_ratio=args["max_aspect_ratio"],
        max_large_decodes=args["max_large_decodes"],
        postprocess=postprocess_choice(args),
    )
    app = create_app(
        args["index"], gallery=args["gallery"], settings=settings, **index_choice(args), **model_choice(args)
    )
    print(f"open http://{args['host']}:{args['port']}/ (Ctrl+C stops the server)")
    serve(app, host=args["host"], port=args["port"])


def main_serve(argv: Sequence[str] | None = None) -> int:
    """``scripts/serve.py``."""
    return run_command(SERVE, argv, _serve, SEARCH_ERRORS)


# --- export ---

EXPORT = Command(
    name="export",
    summary="Export the embedding model (preprocessed images in, embeddings out) with its preprocessing metadata.",
    options={
        **model_options("ckpt", "backbone"),
        "format": Option("onnx", "export format (onnx)"),
        "out": Option(None, "the file to write (none: the checkpoint's path with .onnx, or outputs/export/NAME.onnx)"),
        "opset": Option(17, "ONNX opset"),
        "check": Option(True, "compare onnxruntime with PyTorch on a random batch after exporting"),
    },
)


def _export(args: Arguments) -> None:
    from metricsearch.pipelines.export import export_model

    if args["format"] != "onnx":
        raise UsageError(f"format={args['format']} is not supported; the only format is onnx")
    result = export_model(out=args["out"], opset=args["opset"], check=args["check"], **model_choice(args))
    print(f"exported {result.model} to {result.path}")
    if result.max_difference is not None:
        print(f"onnxruntime vs PyTorch on a random batch: max |difference| = {result.max_difference:.2e}")


def main_export(argv: Sequence[str] | None = None) -> int:
    """``scripts/export.py``."""
    return run_command(EXPORT, argv, _export, SEARCH_ERRORS)
