"""The run folder: the names of the files a training run writes, and their writers and readers.

One folder per run (``hydra.run.dir``, by default ``outputs/train/<time>``):

- ``config.yaml``: the resolved config the run trained with (:func:`write_config`, :func:`read_config`);
- ``untrained_metrics.json``: the test metrics of the untrained model, kept when a run is resumed;
- ``checkpoints/``: the Lightning checkpoints, ``last.ckpt`` among them (``conf/callbacks/model_checkpoint.yaml``
  names the folder ``${paths.output_dir}/checkpoints``; Lightning names ``last.ckpt``);
- ``test_embeddings.npz``: the test set's embeddings with ``save_test_embeddings=true`` (:func:`save_embeddings`);
- ``metrics.json``: the metrics, written last and atomically, so its presence marks a finished run
  (:func:`write_metrics`, :func:`read_metrics`);
- ``reproduce.log`` and ``reproduce.json``: the run's output and its command and duration, when ``make reproduce``
  or ``make compare`` started it.

Every module that writes or reads one of these files takes its name from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metricsearch.utils.atomic_io import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from metricsearch.metrics.metric import CollectedEmbeddings

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
UNTRAINED_METRICS_FILE = "untrained_metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = Path(CHECKPOINT_DIR) / "last.ckpt"
# What a run writes in its folder with save_test_embeddings=true.
TEST_EMBEDDINGS_FILE = "test_embeddings.npz"
REPRODUCE_LOG = "reproduce.log"
REPRODUCE_INFO = "reproduce.json"
_ARRAYS = ("embeddings", "labels", "indices")


def write_config(run_dir: str | os.PathLike[str], config_yaml: str) -> Path:
    """Writes the run's resolved config (its YAML text) atomically; returns the file."""
    path = Path(run_dir) / CONFIG_FILE
    atomic_write_text(path, config_yaml)
    return path


def read_config(run_dir: str | os.PathLike[str]) -> Any:
    """The run's saved config as plain YAML data (a dict for a run of ours).

    Raises:
        OSError: no readable ``config.yaml``.
        yaml.YAMLError: not YAML.
    """
    import yaml

    return yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))


def write_metrics(run_dir: str | os.PathLike[str], summary: dict[str, Any], name: str = METRICS_FILE) -> Path:
    """Writes a metrics summary as indented JSON atomically (``metrics.json`` unless ``name`` says otherwise)."""
    path = Path(run_dir) / name
    atomic_write_text(path, json.dumps(summary, indent=2))
    return path


def read_metrics(run_dir: str | os.PathLike[str], name: str = METRICS_FILE) -> Any:
    """The run's ``metrics.json`` (or the file ``name``) as JSON data.

    Raises:
        OSError: no readable file.
        ValueError: not JSON.
    """
    return json.loads((Path(run_dir) / name).read_text(encoding="utf-8"))


def has_metrics(run_dir: str | os.PathLike[str]) -> bool:
    """Whether the run wrote its ``metrics.json`` (the last thing it writes)."""
    return (Path(run_dir) / METRICS_FILE).exists()


def save_embeddings(path: str | os.PathLike[str], collected: CollectedEmbeddings) -> None:
    """Writes an evaluation's embeddings, labels and dataset indices to an ``.npz`` file atomically.

    Args:
        path: the file to write (a run's :data:`TEST_EMBEDDINGS_FILE`).
        collected: the gathered set, one row per dataset sample sorted by index (``module.last_evaluation``).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            embeddings=np.asarray(collected.embeddings, dtype=np.float32),
            labels=np.asarray(collected.labels, dtype=np.int64),
            indices=np.asarray(collected.indices, dtype=np.int64),
        )


def load_embeddings(path: str | os.PathLike[str]) -> CollectedEmbeddings:
    """Reads a file of :func:`save_embeddings`.

    Raises:
        ValueError: the file lacks one of the arrays or their lengths disagree.
    """
    from metricsearch.metrics.metric import CollectedEmbeddings  # imports torch: only when read

    with np.load(path) as data:
        missing = [name for name in _ARRAYS if name not in data.files]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} array: write it with save_test_embeddings=true")
        collected = CollectedEmbeddings(data["embeddings"], data["labels"], data["indices"])
    if collected.embeddings.ndim != 2 or not len(collected.embeddings) == len(collected.labels) == len(
        collected.indices
    ):
        raise ValueError(f"{path}: embeddings, labels and indices do not have one row per sample each")
    return collected
