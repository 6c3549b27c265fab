"""``make demo``: train (or reuse) a short default run, index its unseen test classes, search, draw the result.

Steps, all under one run folder (``outputs/demo`` by default):

1. ``python train.py`` with the default config (resnet10t, triplet loss, built-in synthetic data) for a few
   minutes, unless the folder already holds a checkpoint from an earlier demo;
2. index every test-class image (classes never seen in training) except one held-out query;
3. search with the query and write ``search_grid.png`` (same-class results framed green, others red);
4. export the model to ONNX and check that it ranks the gallery exactly as the checkpoint does.

Its command line, with the default training length, is :mod:`metricsearch.cli.demo`.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from metricsearch.analysis.run_folder import CONFIG_FILE, LAST_CHECKPOINT, read_metrics
from metricsearch.data.io import load_rgb_image
from metricsearch.inference.export import export_onnx
from metricsearch.inference.model_loading import OnnxEmbedder, load_checkpoint_embedder
from metricsearch.inference.predict_embeddings import make_predict_trainer
from metricsearch.pipelines.index import build_index
from metricsearch.search.errors import SearchError
from metricsearch.search.grid import gallery_loader, save_result_grid
from metricsearch.utils.config import REPO_ROOT

log = logging.getLogger(__name__)


def train_or_reuse(run_dir: Path, train_args: list[str]) -> Path:
    """The demo run's checkpoint: the best one of an earlier demo if there is one, else a fresh short run's."""
    last = run_dir / LAST_CHECKPOINT
    if not last.is_file():
        command = [sys.executable, str(REPO_ROOT / "train.py"), f"hydra.run.dir={run_dir}", *train_args]
        log.info("Training the demo model: %s", " ".join(command))
        subprocess.run(command, cwd=REPO_ROOT, check=True)
    else:
        log.info("Reusing the demo model in %s (delete the folder to retrain)", run_dir)
    try:
        best = Path(read_metrics(run_dir)["best_checkpoint"])
    except (OSError, ValueError, KeyError):
        best = last
    return best if best.is_file() else last


def run_demo(
    out_dir: str | Path,
    k: int,
    max_epochs: int,
    max_time: str,
    train_args: list[str] | None = None,
    backend: str = "faiss",
    uri: str | None = None,
) -> dict[str, Any]:
    """Runs the whole demo; returns the paths it wrote and the search results.

    Args:
        out_dir: the demo's run folder.
        k: results to show.
        max_epochs: training epochs (when training).
        max_time: training wall-clock cap, DD:HH:MM:SS.
        train_args: further ``train.py`` overrides.
        backend: the index backend, ``faiss`` or ``milvus`` (see :mod:`metricsearch.search.backends`).
        uri: with ``milvus``, a Milvus Lite file or server URL (default: ``gallery.db`` in the index folder).
    """
    run_dir = Path(out_dir).expanduser().resolve()
    args = [f"trainer.max_epochs={max_epochs}", f"trainer.max_time={max_time}", "test_untrained=false"]
    checkpoint = train_or_reuse(run_dir, args + list(train_args or []))
    embedder = load_checkpoint_embedder(checkpoint)

    # The test classes exactly as the run saw them: same generator settings, same data folder.
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    test = instantiate(cfg.data.source).load().test
    root = Path(test.paths[0]).parents[1]  # <data>/<config>/images/<class>/<image>.jpg
    relative = [Path(p).relative_to(root).as_posix() for p in test.paths]
    labels = [test.class_names.get(int(c), str(c)) for c in test.labels]
    query_at = 5  # an arbitrary, fixed test image; held out of the gallery so it cannot find itself
    query_file, query_label = root / relative[query_at], labels[query_at]
    gallery_paths = relative[:query_at] + relative[query_at + 1 :]
    gallery_labels = labels[:query_at] + labels[query_at + 1 :]

    index_dir = run_dir / "index"
    index = build_index(
        embedder,
        root,
        index_dir,
        paths=gallery_paths,
        labels=gallery_labels,
        trainer=make_predict_trainer(),
        batch_size=128,
        overwrite=True,
        backend=backend,
        uri=uri,
    )
    query = load_rgb_image(query_file)
    hits = index.search(embedder.embed_images([query]), k)[0]
    grid = save_result_grid(
        query,
        hits,
        gallery_loader(root),
        run_dir / "search_grid.png",
        query_label=query_label,
        query_caption=f"query {relative[query_at]}",
        title=f"top {k} of {len(index)} test-class images (classes unseen in training), {checkpoint.name}",
    )

    onnx_path = export_onnx(embedder, run_dir / "model.onnx")
    onnx_hits = index.search(OnnxEmbedder(onnx_path).embed_images([query]), k)[0]
    if [h.path for h in onnx_hits] != [h.path for h in hits]:
        raise SearchError("the ONNX export ranks the gallery differently from the checkpoint")

    same = sum(h.label == query_label for h in hits)
    print(f"\nquery {query_file} [{query_label}]")
    for h in hits:
        print(f"{h.rank:>3}  {h.score:.4f}  {h.path}  [{h.label}]{'  <- same class' if h.label == query_label else ''}")
    print(f"{same} of the top {k} are of the query's class (a class never seen in training)")
    print(f"ONNX export {onnx_path}: same ranking as the checkpoint")
    print(f"result grid: {grid}")
    print(f"web page:    python scripts/serve.py index={index_dir}   then open http://127.0.0.1:8000/")
    return {
        "checkpoint": str(checkpoint),
        "index": str(index_dir),
        "grid": str(grid),
        "onnx": str(onnx_path),
        "hits": hits,
    }
