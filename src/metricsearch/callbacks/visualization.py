"""Pictures of the embedding space after evaluations: a 2-D map and a retrieval grid, as files and in W&B.

After a validation (every few epochs and the last one) and after a test evaluation, the callback takes the
embeddings the module gathered over all processes (``last_evaluation``) and writes into the run folder:

- ``plots/umap_<tag>.png``: a 2-D UMAP (or PCA) map of a capped sample, coloured by class;
- ``tables/projection_<tag>.csv``: that sample's dataset indices, labels, image paths, 2-D coordinates and
  embedding columns;
- ``plots/retrieval_<tag>.png`` and ``tables/retrieval_<tag>.csv``: the top-k neighbours of a fixed set of
  queries, correct ones framed green and wrong ones red (under the query/gallery protocol, queries searched in the
  gallery);
- ``plots/confusion_<tag>.png`` and ``tables/confusion_<tag>.csv``, when the evaluation has at most
  ``confusion_max_classes`` classes: the neighbour confusion matrix (:mod:`metricsearch.analysis.confusion`);
- ``plots/verification_<tag>.png`` and ``tables/verification_<tag>.csv``, for test evaluations that computed
  verification metrics: the DET and ROC curves over every pair (:mod:`metricsearch.metrics.verification`);

where ``<tag>`` is ``epoch004`` (0-based, like the checkpoint names) for validation and ``test`` (or ``untrained``)
for test evaluations. When a W&B logger is in use the same map and grid are logged as images, the sample as a W&B
Table with thumbnails (for W&B's embedding projector) and the retrieval examples as a second Table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from metricsearch.analysis.confusion import confusion_rows, neighbour_confusion, plot_neighbour_confusion
from metricsearch.analysis.files import save_figure, save_image, write_csv
from metricsearch.analysis.projection import plot_projection, project_to_2d, projection_rows, sample_evenly
from metricsearch.analysis.retrieval_examples import (
    RetrievalExamples,
    draw_retrieval_grid,
    find_retrieval_examples,
    load_thumbnail,
    retrieval_rows,
)
from metricsearch.analysis.verification_plot import plot_verification_curve, verification_rows

log = logging.getLogger(__name__)

VAL = "val"


class VisualizationCallback(Callback):
    """Draws embedding maps and retrieval grids after evaluations (rank zero only; never during the sanity check).

    Args:
        output_dir: The run folder; ``plots/`` and ``tables/`` are created in it. Defaults to the trainer's
            ``default_root_dir``.
        every_n_epochs: Draw the validation set every N epochs and after the last validation of the fit; 0 never
            draws validation sets (test evaluations are still drawn).
        prefixes: Which evaluations to draw: ``val``, ``test`` and/or ``untrained`` (the untrained model's test
            evaluation, a useful "before" picture).
        method: ``umap`` or ``pca``. UMAP compiles itself on first use (10-20 s per process) and takes a few
            seconds per map; sets smaller than ``umap_min_points`` get PCA.
        max_points: Cap on the points of a map (a seeded sample, the same in every epoch).
        max_table_rows: Cap on the rows of the W&B projection table (each row carries a thumbnail).
        num_queries: Queries of the retrieval grid (of distinct classes, the same in every epoch).
        top_k: Neighbours shown per query.
        thumbnail_size: Side in pixels of the images in the retrieval grid.
        wandb_thumbnail_size: Side in pixels of the thumbnails in W&B tables.
        umap_min_points: Below this many points, PCA replaces UMAP.
        seed: Seed of the samples, the query choice and the UMAP layout.
        confusion_max_classes: Draw the neighbour confusion matrix of evaluations with at most this many classes
            (0: never).
        confusion_queries_per_class: Queries per class of the confusion matrix (the first images of each class).
        confusion_k: Neighbours per query of the confusion matrix.
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        every_n_epochs: int = 5,
        prefixes: Sequence[str] = ("val", "test"),
        method: str = "umap",
        max_points: int = 1000,
        max_table_rows: int = 500,
        num_queries: int = 8,
        top_k: int = 5,
        thumbnail_size: int = 64,
        wandb_thumbnail_size: int = 48,
        umap_min_points: int = 100,
        seed: int = 0,
        confusion_max_classes: int = 50,
        confusion_queries_per_class: int = 10,
        confusion_k: int = 10,
    ) -> None:
        super().__init__()
        if method not in ("umap", "pca"):
            raise ValueError(f"callbacks.visualization.method must be 'umap' or 'pca', got {method!r}")
        self.output_dir = Path(output_dir) if output_dir else None
        self.every_n_epochs = every_n_epochs
        self.prefixes = tuple(prefixes)
        self.method = method
        self.max_points = max_points
        self.max_table_rows = max_table_rows
        self.num_queries = num_queries
        self.top_k = top_k
        self.thumbnail_size = thumbnail_size
        self.wandb_thumbnail_size = wandb_thumbnail_size
        self.umap_min_points = umap_min_points
        self.seed = seed
        self.confusion_max_classes = confusion_max_classes
        self.confusion_queries_per_class = confusion_queries_per_class
        self.confusion_k = confusion_k
        # The epoch of the latest validation not drawn yet, drawn at the end of fitting if training stops early.
        self._pending_epoch: int | None = None

    # ----------------------------------------------------------------------------------------------- Lightning hooks
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._draws_validation():
            return
        epoch = trainer.current_epoch
        is_last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs == 0 or is_last:
            self._draw(trainer, pl_module, VAL, f"epoch{epoch:03d}")
            self._pending_epoch = None
        else:
            self._pending_epoch = epoch

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training that stopped before max_epochs (max_time, early stopping) still gets its final picture.
        if self._pending_epoch is not None and trainer.is_global_zero and self._draws_validation():
            self._draw(trainer, pl_module, VAL, f"epoch{self._pending_epoch:03d}")
        self._pending_epoch = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prefix = getattr(pl_module, "test_prefix", "test")
        if trainer.is_global_zero and prefix in self.prefixes:
            self._draw(trainer, pl_module, prefix, prefix)

    # ------------------------------------------------------------------------------------------------------ drawing
    def _draws_validation(self) -> bool:
        return VAL in self.prefixes and self.every_n_epochs > 0

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, tag: str) -> None:
        evaluation = getattr(pl_module, "last_evaluation", {}).get(prefix)
        if evaluation is None or len(evaluation.embeddings) < 2:
            return
        out = self.output_dir or Path(trainer.default_root_dir)
        records = _split_records(trainer, prefix)
        paths = None if records is None else records.paths
        names = records.class_names if records is not None else {}
        query_count = _query_count(trainer, prefix)
        embeddings, labels, indices = evaluation.embeddings, evaluation.labels, evaluation.indices
        metrics = getattr(pl_module, "last_metrics", {}).get(prefix, {})
        recall = f", R@1 {100 * metrics['recall@1']:.1f}%" if "recall@1" in metrics else ""

        sample = sample_evenly(len(embeddings), self.max_points, self.seed)
        coords, method = project_to_2d(embeddings[sample], self.method, self.seed, umap_min_points=self.umap_min_points)
        where = prefix if tag == prefix else f"{prefix}, epoch {int(tag.removeprefix('epoch'))}"
        num_classes = len(np.unique(labels[sample]))
        title = f"{where}: {method.upper()} of {len(sample)} embeddings, {num_classes} classes{recall}"
        map_path = out / "plots" / f"{method}_{tag}.png"
        save_figure(plot_projection(coords, labels[sample], title, method=method), map_path)
        rows = projection_rows(coords, embeddings[sample], labels[sample], indices[sample], paths, method=method)
        write_csv(out / "tables" / f"projection_{tag}.csv", rows)

        examples = find_retrieval_examples(
            embeddings,
            labels,
            indices,
            num_queries=self.num_queries,
            k=self.top_k,
            seed=self.seed,
            query_count=query_count,
        )
        grid_path = None
        if paths is not None:
            grid_title = f"{where}: top-{self.top_k} of {len(examples.query_indices)} queries{recall}"
            grid = draw_retrieval_grid(
                examples, paths, thumbnail_size=self.thumbnail_size, title=grid_title, class_names=names
            )
            grid_path = out / "plots" / f"retrieval_{tag}.png"
            save_image(grid, grid_path)
            write_csv(out / "tables" / f"retrieval_{tag}.csv", retrieval_rows(examples, paths))

        confusion = None
        if 0 < len(np.unique(labels)) <= self.confusion_max_classes:
            confusion = neighbour_confusion(
                embeddings,
                labels,
                indices,
                per_class=self.confusion_queries_per_class,
                k=self.confusion_k,
                query_count=query_count,
            )
            confusion_title = f"{where}: first {self.confusion_queries_per_class} images of each class{recall}"
            confusion_path = out / "plots" / f"confusion_{tag}.png"
            save_figure(plot_neighbour_confusion(confusion, names, confusion_title), confusion_path)
            write_csv(out / "tables" / f"confusion_{tag}.csv", confusion_rows(confusion, names))

        curve = getattr(pl_module, "last_verification", {}).get(prefix)
        verification_path = None
        if curve is not None:
            verification_path = out / "plots" / f"verification_{tag}.png"
            save_figure(plot_verification_curve(curve, where), verification_path)
            write_csv(out / "tables" / f"verification_{tag}.csv", verification_rows(curve))

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(
                    logger, trainer.global_step, prefix, method, map_path, title, rows, examples, paths, grid_path
                )
                if confusion is not None:
                    self._log_wandb_confusion(logger, trainer.global_step, prefix, confusion, names, confusion_path)
                if verification_path is not None:
                    self._log_wandb_verification(logger, trainer.global_step, prefix, curve, verification_path)

    def _log_wandb(
        self,
        logger: WandbLogger,
        step: int,
        prefix: str,
        method: str,
        map_path: Path,
        title: str,
        rows: list[dict[str, Any]],
        examples: RetrievalExamples,
        paths: Sequence[Path] | None,
        grid_path: Path | None,
    ) -> None:
        import wandb

        payload: dict[str, Any] = {f"{prefix}/{method}": wandb.Image(str(map_path), caption=title)}
        table_rows = rows[: self.max_table_rows] if self.max_table_rows > 0 else rows
        embedding_columns = [c for c in (table_rows[0] if table_rows else {}) if c.startswith("e") and c[1:].isdigit()]
        columns = ["index", "label", "image", "x", "y", *embedding_columns]
        data = [
            [row["index"], row["label"], self._wandb_thumbnail(paths, row["index"]), row["x"], row["y"]]
            + [row[c] for c in embedding_columns]
            for row in table_rows
        ]
        payload[f"{prefix}/projection"] = wandb.Table(columns=columns, data=data)
        if grid_path is not None:
            payload[f"{prefix}/retrieval_grid"] = wandb.Image(str(grid_path))
            payload[f"{prefix}/retrieval"] = self._retrieval_table(examples, paths)
        logger.log_metrics(payload, step=step)

    def _log_wandb_confusion(
        self, logger: WandbLogger, step: int, prefix: str, confusion: Any, names: dict, path: Path
    ) -> None:
        """The confusion matrix as an image and as W&B's interactive confusion-matrix chart."""
        import wandb

        # W&B's chart takes one (true, predicted) pair per neighbour, as positions into class_names.
        rows, columns = np.nonzero(confusion.counts)
        repeats = confusion.counts[rows, columns]
        class_names = [str(names.get(int(c), int(c))) for c in confusion.classes]
        chart = wandb.plot.confusion_matrix(
            y_true=np.repeat(rows, repeats).tolist(),
            preds=np.repeat(columns, repeats).tolist(),
            class_names=class_names,
            title=f"{prefix}: classes of the {confusion.k} nearest neighbours",
        )
        logger.log_metrics(
            {f"{prefix}/confusion": wandb.Image(str(path)), f"{prefix}/confusion_matrix": chart}, step=step
        )

    def _log_wandb_verification(self, logger: WandbLogger, step: int, prefix: str, curve: Any, path: Path) -> None:
        """The DET / ROC picture, and the ROC curve as a W&B line chart (at most ~200 points, evenly chosen)."""
        import wandb

        keep = np.unique(np.linspace(0, len(curve.fmr) - 1, num=min(200, len(curve.fmr))).astype(int))
        table = wandb.Table(
            columns=["fmr", "tmr"], data=[[float(curve.fmr[i]), float(1 - curve.fnmr[i])] for i in keep]
        )
        chart = wandb.plot.line(table, "fmr", "tmr", title=f"{prefix}: ROC (true match rate against FMR)")
        logger.log_metrics({f"{prefix}/verification": wandb.Image(str(path)), f"{prefix}/roc": chart}, step=step)

    def _wandb_thumbnail(self, paths: Sequence[Path] | None, index: int, caption: str | None = None) -> Any:
        import wandb

        if paths is None:
            return None
        return wandb.Image(load_thumbnail(paths[index], self.wandb_thumbnail_size), caption=caption)

    def _retrieval_table(self, examples: RetrievalExamples, paths: Sequence[Path]) -> Any:
        """One row per query: the query image, its top-k neighbours (captioned label, score and right/wrong)."""
        import wandb

        k = examples.neighbor_indices.shape[1]
        columns = ["query", "query_label", "query_image"] + [f"result_{r + 1}" for r in range(k)] + ["hits"]
        correct = examples.correct
        data = []
        for q, query in enumerate(examples.query_indices):
            results = [
                self._wandb_thumbnail(
                    paths,
                    int(examples.neighbor_indices[q, r]),
                    f"{'correct' if correct[q, r] else 'wrong'}: class {int(examples.neighbor_labels[q, r])}, "
                    f"{examples.scores[q, r]:.2f}",
                )
                for r in range(k)
            ]
            query_image = self._wandb_thumbnail(paths, int(query), f"query: class {int(examples.query_labels[q])}")
            data.append([int(query), int(examples.query_labels[q]), query_image, *results, int(correct[q].sum())])
        return wandb.Table(columns=columns, data=data)


def _split_records(trainer: L.Trainer, prefix: str) -> Any:
    """The images an evaluation ran on (the validation set, or the test set / queries + gallery), if known."""
    datamodule = getattr(trainer, "datamodule", None)
    if prefix == VAL and not getattr(datamodule, "validate_on_test", False):
        return getattr(datamodule, "val_records", None)
    split = getattr(datamodule, "split", None)
    return None if split is None else split.evaluation


def _query_count(trainer: L.Trainer, prefix: str) -> int | None:
    """How many of the evaluation's first images are queries searched in a gallery (None: a self-search)."""
    datamodule = getattr(trainer, "datamodule", None)
    return getattr(datamodule, "val_num_queries" if prefix == VAL else "test_num_queries", None)
