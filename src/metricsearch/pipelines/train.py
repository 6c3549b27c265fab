"""Assembles a training run from a composed Hydra config, trains it, and evaluates it on unseen classes."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from metricsearch.analysis.run_folder import (
    TEST_EMBEDDINGS_FILE,
    UNTRAINED_METRICS_FILE,
    read_metrics,
    save_embeddings,
    write_config,
    write_metrics,
)
from metricsearch.data.datamodule import MetricDataModule
from metricsearch.data.records import CLOSED_SET, DatasetError
from metricsearch.data.samplers import SamplerConfigError
from metricsearch.models.backbone import PretrainedWeightsError
from metricsearch.models.embedding_model import build_embedding_model
from metricsearch.models.model_config import ModelConfig
from metricsearch.models.module import MetricLearningModule, NonFiniteLossError
from metricsearch.models.self_supervised import SelfSupervisedModule
from metricsearch.models.tuple_module import TupleModule
from metricsearch.pipelines.resume import CheckpointError, check_checkpoint_matches
from metricsearch.pipelines.run_config import RunConfig, resolve_run_config
from metricsearch.pipelines.selection import TEST_EPOCH_PREFIX, fall_back_to_last, selection_record
from metricsearch.utils.checkpoint_io import CheckpointWriteError
from metricsearch.utils.config import ConfigError, instantiate_partial_with, to_plain
from metricsearch.utils.console_logging import quiet_lightning_console
from metricsearch.utils.loggers import finish_loggers
from metricsearch.utils.report import format_metrics_table

# Problems the user can fix (a setting, the data, a checkpoint, a full disk): `train.py` prints their one-line
# message without a traceback.
USER_ERRORS = (
    ConfigError,
    SamplerConfigError,
    DatasetError,
    CheckpointError,
    CheckpointWriteError,
    NonFiniteLossError,
    PretrainedWeightsError,
)


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiates every ``_target_`` node of a group like ``callbacks`` or ``logger`` (a dict of named parts)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


def supervision_of(cfg: DictConfig) -> str:
    """What training reads (``conf/supervision``): ``class``, ``pairs``, ``triplets`` or ``none``."""
    return str(OmegaConf.select(cfg, "supervision.mode", default="class"))


def _build_loss(cfg: DictConfig, supervision: str, num_classes: int, embedding_dim: int) -> tuple[Any, float]:
    """The loss and its learning-rate multiplier: the ``loss`` group's, or under ``supervision=none`` the one of
    ``supervision.method``."""
    if supervision == "none":
        if cfg.get("loss") is not None:
            raise ConfigError(
                "supervision=none trains with the loss of supervision.method (simclr, vicreg or moco; its settings "
                "under supervision.losses), not the loss group: leave loss= out, and add ~loss when an experiment= "
                "sets one"
            )
        method = str(cfg.supervision.method)
        if method not in cfg.supervision.losses:
            raise ConfigError(
                f"supervision.method={method} is not one of {', '.join(cfg.supervision.losses)}; choose one of those"
            )
        return instantiate(cfg.supervision.losses[method]), 1.0
    if cfg.get("loss") is None:
        raise ConfigError(f"supervision={supervision} needs a loss; choose one, e.g. loss=contrastive")
    loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
    loss_lr_multiplier = float(loss_cfg.pop("lr_multiplier", 1.0))
    # Only labelled training has classes to give a proxy or classification loss.
    classes = {"num_classes": num_classes} if supervision == "class" else {}
    return instantiate_partial_with(loss_cfg, embedding_size=embedding_dim, **classes), loss_lr_multiplier


def build_run(cfg: DictConfig) -> tuple[MetricLearningModule, MetricDataModule]:
    """Instantiates model, data, loss, miner and optimizer from ``cfg`` and wires them into the Lightning module."""
    supervision = supervision_of(cfg)
    model = build_embedding_model(cfg.backbone, cfg.head)
    data_config = model.backbone.data_config
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") else None
    unlabelled = {}
    if supervision != "class":
        unlabelled["supervision"] = supervision
    if supervision == "none":
        unlabelled["views"] = to_plain(cfg.supervision.get("views")) or {}
    datamodule: MetricDataModule = instantiate(
        cfg.data,
        sampler=sampler,
        mean=list(data_config["mean"]),
        std=list(data_config["std"]),
        channel_order=data_config.get("channel_order", "RGB"),
        **unlabelled,
    )
    datamodule.prepare_data()
    datamodule.setup()
    # The training batch sampler checks m against the class sizes; build it now, so an impossible setting stops the
    # run here rather than after the untrained evaluation.
    datamodule.train_dataloader()

    num_classes = datamodule.num_train_classes if supervision == "class" else 0
    loss, loss_lr_multiplier = _build_loss(cfg, supervision, num_classes, model.embedding_dim)
    miner = instantiate(cfg.miner) if cfg.get("miner") else None
    # Everything needed to rebuild the embedder and its preprocessing from a checkpoint, without Hydra. The
    # checkpoint holds the weights: rebuilding it never downloads or reads pretrained ones.
    model_config = ModelConfig.describe(
        model,
        backbone_cfg={**to_plain(cfg.backbone), "pretrained": False, "weights_file": None},
        head_cfg=to_plain(cfg.head),
        image_size=cfg.data.image_size,
        resize_size=cfg.data.get("resize_size"),
    )
    # `interval` (epoch or step) tells Lightning when to step the scheduler; the scheduler class does not take it.
    scheduler_cfg = to_plain(cfg.get("scheduler")) or {}
    scheduler_interval = scheduler_cfg.pop("interval", "epoch")
    scheduler_metric = scheduler_cfg.pop("metric", None)
    module_class, extra = MetricLearningModule, {}
    if supervision in ("pairs", "triplets"):
        module_class, extra = TupleModule, {"supervision": supervision}
    elif supervision == "none":
        options = cfg.supervision
        module_class = SelfSupervisedModule
        extra = {
            "method": str(options.method),
            "projector_dims": list(options.projector_dims),
            "momentum": float(options.momentum),
            "queue_size": int(options.queue_size),
        }
    module = module_class(
        **extra,
        model=model,
        loss=loss,
        miner=miner,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(scheduler_cfg) if scheduler_cfg else None,
        loss_lr_multiplier=loss_lr_multiplier,
        scheduler_interval=scheduler_interval,
        scheduler_metric=scheduler_metric,
        recall_at_k=datamodule.recall_at_k,
        model_config=model_config.to_dict(),
        **(to_plain(cfg.get("module")) or {}),
    )
    return module, datamodule


def supervision_record(supervision: str, datamodule: MetricDataModule) -> dict[str, Any]:
    """What ``metrics.json`` records of the supervision: its mode, and the labels training cost."""
    record: dict[str, Any] = {"mode": supervision, "class_labels_read_in_training": supervision == "class"}
    if datamodule.tuples is not None:
        record[f"{supervision}_file"] = str(datamodule.tuples.file)
        record["tuples"] = len(datamodule.tuples)
        record["images_in_tuples"] = len(datamodule.tuples.paths)
    elif supervision == "class":
        record["labelled_images"] = len(datamodule.train_records)
    else:
        record["unlabelled_images"] = len(datamodule.train_records)
    return record


def _no_validation_reason(supervision: str, closed_set: bool) -> str:
    """Why a run without class labels has nothing to select its checkpoint on."""
    held_out = "images of the training classes" if closed_set else "training classes"
    if supervision in ("pairs", "triplets"):
        named = "every training image" if closed_set else "an image of every training class"
        return (
            f"supervision={supervision} and no labelled {held_out} are held out of training (data.{supervision}_file "
            f"names {named}, or there are fewer than two classes to validate on, or data.val_fraction=0)"
        )
    return (
        f"supervision={supervision} and no labelled {held_out} are held out of training (data.val_fraction=0, or "
        "the dataset has none to hold out)"
    )


def _test(trainer: L.Trainer, module: MetricLearningModule, datamodule: MetricDataModule, prefix: str, **kw) -> dict:
    module.test_prefix = prefix
    results = trainer.test(module, datamodule=datamodule, verbose=False, **kw)
    return {k.split("/", 1)[1]: float(v) for k, v in (results[0] if results else {}).items() if k.startswith(prefix)}


def train(run: RunConfig | DictConfig) -> dict[str, float]:
    """Trains and evaluates one run; returns the flat metric dict (what sweepers optimize).

    Order: evaluate the untrained model on the test classes, fit with checkpoint selection on validation
    classes, evaluate the best checkpoint on the test classes, write ``metrics.json`` and print a table.
    ``selection=last`` tests the final model instead, and ``selection=test_best`` reports the best per-epoch
    test evaluation (optimistic; see :mod:`metricsearch.pipelines.selection`).

    Args:
        run: the resolved config (``train.py`` resolves it before importing torch), or a composed one, which is
            resolved here (:func:`~metricsearch.pipelines.run_config.resolve_run_config`).
    """
    quiet_lightning_console()  # Lightning's INFO lines go to the run's log file, not the console
    if not isinstance(run, RunConfig):
        run = resolve_run_config(run)
    cfg, selection, output_dir = run.cfg, run.selection, run.output_dir
    ckpt_path, ckpt_setting = run.ckpt_path, run.ckpt_setting
    if ckpt_path:
        # Before any data or model is built: a damaged or foreign checkpoint is refused in seconds.
        model = {"backbone": to_plain(cfg.backbone), "head": to_plain(cfg.head)}
        check_checkpoint_matches(ckpt_path, model, ckpt_setting)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    write_config(output_dir, OmegaConf.to_yaml(cfg, resolve=True))

    module, datamodule = build_run(cfg)
    supervision = supervision_of(cfg)
    closed_set = datamodule.split.protocol == CLOSED_SET
    fallback_reason = None
    if supervision != "class" and selection == "val" and len(datamodule.val_records) == 0:
        # Without labelled classes held out of training there is nothing to select on: test the last model.
        fallback_reason = _no_validation_reason(supervision, closed_set)
        cfg, selection = fall_back_to_last(cfg, fallback_reason)
        write_config(output_dir, OmegaConf.to_yaml(cfg, resolve=True))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    results: dict[str, dict[str, float]] = {}
    untrained_file = output_dir / UNTRAINED_METRICS_FILE
    if cfg.get("test_untrained"):
        # A resumed run keeps the untrained numbers measured when it started.
        if ckpt_path and untrained_file.is_file():
            results["untrained"] = read_metrics(output_dir, UNTRAINED_METRICS_FILE)
        else:
            results["untrained"] = _test(trainer, module, datamodule, "untrained")
            if trainer.is_global_zero:
                write_metrics(output_dir, results["untrained"], UNTRAINED_METRICS_FILE)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    # The monitored value of the selected checkpoint: on validation classes, or (test_best) on the test classes.
    best_key = f"{TEST_EPOCH_PREFIX}_best" if selection == "test_best" else "val_best"
    if checkpoint is not None and checkpoint.monitor is not None and checkpoint.best_model_score is not None:
        results[best_key] = {cfg.monitor.split("/", 1)[1]: float(checkpoint.best_model_score)}
    # Read before testing: the test evaluation replaces trainer.callback_metrics.
    selected_val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
    if best_key in results:
        selected_val = {cfg.monitor: results[best_key][cfg.monitor.split("/", 1)[1]]}
    if cfg.get("test"):
        results["test"] = _test(trainer, module, datamodule, "test", ckpt_path=best_path or None)
        if cfg.get("save_test_embeddings") and trainer.is_global_zero:
            # Gathered over every process and sorted by dataset index, as the test metrics were computed from.
            save_embeddings(output_dir / TEST_EMBEDDINGS_FILE, module.last_evaluation["test"])

    summary = {
        "selection": selection_record(selection, cfg.monitor, supervision, closed_set, fallback_reason),
        "supervision": supervision_record(supervision, datamodule),
        "metrics": results,
        "best_checkpoint": best_path,
        "epochs_trained": trainer.current_epoch,
        "global_step": trainer.global_step,
    }
    if trainer.is_global_zero:
        write_metrics(output_dir, summary)
        title = f"{cfg.get('task_name', 'train')}: {output_dir} (selection={selection})"
        print(format_metrics_table(results, title=title))
        if selection == "test_best":
            print(f"selection=test_best: {summary['selection']['description']}.")
    flat = {f"{split}/{name}": value for split, values in results.items() for name, value in values.items()}
    # The sweepers' objective (`optimized_metric: ${monitor}`): the validation metric of the checkpoint that was
    # selected and tested, never a later epoch's. Only the monitored value of the best epoch is known; without
    # checkpoint selection the last epoch is the model, so its validation metrics are.
    flat.update(selected_val)
    # Close the W&B run now, so its offline files are complete when train() returns and the next job of a
    # multirun or Optuna study starts its own run.
    finish_loggers(loggers)
    return flat
