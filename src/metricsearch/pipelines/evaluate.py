"""Evaluating a model on a labelled set of one's own: ``scripts/evaluate.py ckpt=PATH data=folder data.root=DIR``.

The answer to "how good is this model on MY photos?", measured exactly as training measures its test set: the
model (a training checkpoint, or a pretrained backbone used as is) goes into the project's
:class:`~metricsearch.models.module.MetricLearningModule`, the data into the
:class:`~metricsearch.data.datamodule.MetricDataModule` of the training config's ``data=`` option, and Lightning's
test loop embeds the evaluation set and computes the metrics. The evaluation set is the dataset's: a test set
searched against itself (``root/<class>/``, every class by default; ``root/test/``), or queries searched in a
gallery (``root/query/`` + ``root/gallery/``).

The images are preprocessed as the model expects (its own input size, resize, mean, std and channel order), not as
the data config's defaults say, so a checkpoint is measured with the preprocessing it was trained with.

Everything is written into one output folder: ``metrics.json``, the retrieval grid ``plots/retrieval_test.png``,
an embedding map, and for evaluations of at most ``max_confusion_classes`` classes the neighbour confusion matrix
(``plots/confusion_test.png``, ``tables/confusion_test.csv``), drawn by the training runs' visualization callback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from metricsearch.analysis.run_folder import write_metrics
from metricsearch.callbacks.visualization import VisualizationCallback
from metricsearch.data.datamodule import MetricDataModule
from metricsearch.data.disk_source import SplitCounts
from metricsearch.inference.errors import ModelLoadError
from metricsearch.inference.model_choice import ModelChoice
from metricsearch.inference.model_loading import TorchEmbedder, load_embedder
from metricsearch.inference.predict_embeddings import predict_trainer_settings
from metricsearch.models.module import MetricLearningModule
from metricsearch.utils.config import CONFIG_DIR, ConfigError, normalize_overrides, to_plain
from metricsearch.utils.report import format_metrics_table

log = logging.getLogger(__name__)

# The data option evaluated when the command names none.
DEFAULT_DATA = "folder"
# The prefix of the evaluation's metric keys and picture names (plots/retrieval_test.png).
PREFIX = "test"


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_model` measured and wrote.

    Attributes:
        metrics: The retrieval metrics (``recall@1``, ``map@r``, ..., ``num_queries``), as training's test reports.
        out: The output folder.
        files: The files written, relative to ``out``.
        summary: The document written to ``metrics.json``.
    """

    metrics: dict[str, float]
    out: Path
    files: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def default_output_dir() -> Path:
    """``outputs/evaluate/<date>_<time>``, as training names its run folders."""
    return Path("outputs") / "evaluate" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def compose_evaluation_config(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """The training config with ``overrides`` (``data=``, ``data.*``, ``trainer=``, ``trainer.*``), composed as
    ``python train.py`` composes it, evaluating ``data=folder`` unless another ``data=`` is given.

    For ``data=folder`` every class of a ``root/<class>/`` folder is evaluated (``train_fraction=0``) unless
    ``data.source.train_fraction`` is given: a model evaluated on someone's photos was not trained on half of them.

    Raises:
        ConfigError: the overrides do not compose.
    """
    overrides = normalize_overrides(list(overrides))
    keys = [o.partition("=")[0].lstrip("+~") for o in overrides]
    data = next((o.partition("=")[2] for o, k in zip(overrides, keys, strict=True) if k == "data"), None)
    defaults = [] if data else [f"data={DEFAULT_DATA}"]
    if (data or DEFAULT_DATA) == "folder" and "data.source.train_fraction" not in keys:
        defaults.append("data.source.train_fraction=0")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=[*defaults, *overrides, f"paths.output_dir={output_dir}"])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad configuration: {err}") from err
    finally:
        GlobalHydra.instance().clear()


def _torch_embedder(choice: ModelChoice) -> TorchEmbedder:
    embedder = load_embedder(**choice)
    if not isinstance(embedder, TorchEmbedder):
        raise ModelLoadError(
            f"{embedder.describe()} is an ONNX export; evaluate the checkpoint it was exported from (ckpt=PATH.ckpt) "
            "or a backbone (backbone=NAME)"
        )
    return embedder


def build_datamodule(
    cfg: DictConfig, embedder: TorchEmbedder, batch_size: int | None, num_workers: int | None
) -> MetricDataModule:
    """The data config's datamodule, preprocessing images as ``embedder``'s model expects."""
    prep = embedder.preprocessing
    settings: dict[str, Any] = {
        "sampler": None,
        "image_size": prep["image_size"],
        "resize_size": prep["resize_size"],
        "mean": list(prep["mean"]),
        "std": list(prep["std"]),
        "channel_order": prep.get("channel_order", "RGB"),
        # Nothing is trained, so nothing is held out of the training images for validation.
        "val_fraction": 0.0,
        "num_folds": 0,
    }
    if batch_size is not None:
        settings["eval_batch_size"] = batch_size
    if num_workers is None:
        # More decoding processes than cores only slows an evaluation down (and makes torch warn).
        num_workers = min(int(cfg.data.get("num_workers", 0)), len(os.sched_getaffinity(0)))
    settings["num_workers"] = num_workers
    try:
        return instantiate(cfg.data, **settings)
    except (HydraException, OmegaConfBaseException, TypeError) as err:
        raise ConfigError(f"bad data configuration: {err}") from err


def evaluate_model(
    choice: ModelChoice,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    max_confusion_classes: int = 50,
    progress_bar: bool = False,
) -> Evaluation:
    """Measures a model on a dataset's evaluation set with training's test loop; writes and returns the results.

    Args:
        choice: The model: ``ckpt`` (a training checkpoint) or ``backbone`` (a ``conf/backbone`` option, used
            without training).
        overrides: Training-config overrides naming the data and the hardware: ``data=folder``,
            ``data.root=DIR``, ``data.source.protocol=closed_set``, ``trainer=gpu``, ``trainer.devices=2``...
        out: The output folder (default: :func:`default_output_dir`).
        batch_size: Images per batch and process (default: the data config's ``eval_batch_size``).
        num_workers: Image-decoding processes (default: the data config's, at most one per available core).
        max_confusion_classes: Draw the neighbour confusion matrix when the evaluation has at most this many
            classes (0: never).
        progress_bar: Show Lightning's progress bar while embedding.

    Raises:
        ModelLoadError: The model cannot be loaded (a missing file, another model's checkpoint...).
        ConfigError: The overrides do not compose.
        DatasetError: The data is missing or malformed.
    """
    out = Path(out if out is not None else default_output_dir()).expanduser().resolve()
    cfg = compose_evaluation_config(overrides, out)
    # The model first: a wrong checkpoint is refused before any image is read. Seeded, so that a backbone's
    # randomly initialised layers (a backbone without pretrained weights) are the same in every evaluation.
    L.seed_everything(int(cfg.get("seed", 0)), verbose=False)
    embedder = _torch_embedder(choice)
    datamodule: MetricDataModule = build_datamodule(cfg, embedder, batch_size, num_workers)
    datamodule.prepare_data()
    split = datamodule.source.load()
    source = datamodule.source
    log.info(
        "Evaluating %s on %s (%s)", embedder.describe(), getattr(source, "root", "?"), SplitCounts.of(split).describe()
    )

    evaluation_keys = ("compute_nmi", "nmi_max_macs", "postprocess", "verification_fmrs")
    module_cfg = to_plain(cfg.get("module")) or {}
    module_options = {k: module_cfg[k] for k in evaluation_keys if k in module_cfg}
    # NOTE: no loss, miner or optimizer: the test loop never trains, and the module's evaluation is the same as in
    # a training run's test.
    module = MetricLearningModule(
        model=embedder.model,
        loss=None,
        miner=None,
        optimizer=None,
        recall_at_k=datamodule.recall_at_k,
        model_config=embedder.model_config,
        **module_options,
    )
    module.test_prefix = PREFIX
    visualization = VisualizationCallback(
        output_dir=out,
        prefixes=(PREFIX,),
        method="pca",
        confusion_max_classes=max_confusion_classes,
        seed=int(cfg.get("seed", 0)),
    )
    out.mkdir(parents=True, exist_ok=True)
    trainer_settings = {**predict_trainer_settings(progress_bar), "default_root_dir": str(out)}
    try:
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[visualization], **trainer_settings)
    except (HydraException, OmegaConfBaseException, TypeError, ValueError) as err:
        raise ConfigError(f"bad trainer configuration: {err}") from err
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {name: float(value) for name, value in module.last_metrics.get(PREFIX, {}).items()}

    summary = {
        "model": {**embedder.source, "fingerprint": embedder.fingerprint},
        "data": {
            "option": cfg.data.get("source", {}).get("_target_", cfg.data.get("_target_")),
            "root": str(getattr(source, "dataset_dir", None) or getattr(source, "root", "")),
            "layout": getattr(source, "layout", None),
            "protocol": split.protocol,
            **SplitCounts.of(split).as_dict(),
        },
        "preprocessing": embedder.preprocessing,
        "metrics": {PREFIX: metrics},
    }
    if trainer.is_global_zero:
        write_metrics(out, summary)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return Evaluation(metrics=metrics, out=out, files=files, summary=summary)


def format_evaluation(evaluation: Evaluation) -> str:
    """The metrics table and the files written, as ``scripts/evaluate.py`` prints them."""
    model, data = evaluation.summary["model"], evaluation.summary["data"]
    lines = [
        f"model: {model['kind']} {model['path']} (fingerprint {model['fingerprint'][:12]})",
        f"data: {data['root']} ({data.get('layout') or data['protocol']})",
        format_metrics_table({PREFIX: evaluation.metrics}).rstrip(),
    ]
    lines.append(f"wrote {evaluation.out}: {', '.join(evaluation.files)}")
    return "\n".join(lines)
