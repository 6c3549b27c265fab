"""The dataset tools behind ``scripts/check_data.py`` and ``scripts/prepare_data.py`` (their command lines are in
:mod:`metricsearch.cli.data`).

Both compose the same Hydra config as ``train.py``, so ``data=cub data.source.root=PATH`` (or the shorthand
``data.root=PATH``) means the same thing everywhere, and instantiate only ``data.source``: checking a dataset needs
neither torch nor a model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException

from metricsearch.data.disk_source import DiskSource, SplitCounts, listed_paths, summarize, verify_images
from metricsearch.data.download import DISTRIBUTIONS, DownloadError, describe_distribution
from metricsearch.data.download import prepare_dataset as download_and_prepare
from metricsearch.data.records import DatasetError
from metricsearch.utils.config import CONFIG_DIR, ConfigError, normalize_overrides


def compose_data_source(overrides: Sequence[str]) -> Any:
    """The ``data.source`` object that ``python train.py OVERRIDES`` would build.

    Raises:
        ConfigError: the overrides do not compose, or the source cannot be built from them.
        DatasetError: the data config has no ``source`` node.
    """
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=normalize_overrides(list(overrides)))
        if "source" not in cfg.data:
            raise DatasetError(f"the data config {cfg.data.get('_target_')} has no `source` node to check")
        return instantiate(cfg.data.source)
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc


def check_data(overrides: Sequence[str], verify: bool = False, strict: bool = False) -> None:
    """Prints the counts of the dataset copy ``overrides`` name as one JSON line.

    A count mismatch with the complete dataset is a warning (and ``"matches_expected": false`` in the JSON) unless
    ``strict``.

    Args:
        overrides: training-config overrides naming the dataset, e.g. ``data=cub data.root=PATH``.
        verify: decode every image (slow) and report the first bad one.
        strict: a count that differs from the complete dataset's is an error.

    Raises:
        ConfigError: the overrides do not compose.
        DatasetError: the copy is broken (the message names what and where).
    """
    source = compose_data_source(overrides)
    if isinstance(source, DiskSource):
        source.verify_images = source.verify_images or verify
        source.strict = source.strict or strict
    split = source.load()
    summary = summarize(source, split)
    if verify and not summary["images_verified"]:
        # Sources that are not DiskSources (built-in data) are verified here, with the same decoder.
        verify_images(listed_paths(split))
        summary["images_verified"] = True
    print(json.dumps(summary))


def prepare_data(
    overrides: Sequence[str],
    info: bool = False,
    mirror: str | None = None,
    downloads: str | Path | None = None,
    timeout: float = 60.0,
    force: bool = False,
) -> int:
    """Downloads, verifies and unpacks the dataset ``overrides`` name, or says where to get it; returns the exit status.

    0 when the dataset is ready (or there is nothing to download, or ``info``); 1 when it could not be downloaded
    (the error, then the sources and expected layout are printed).

    Args:
        overrides: training-config overrides naming the dataset, e.g. ``data=cub``.
        info: print the sources and layout without downloading.
        mirror: fetch every file from ``MIRROR/<filename>`` instead of the known sources.
        downloads: where archives are kept (default: ``downloads/`` beside the data root).
        timeout: seconds to wait for a connection or read.
        force: download and unpack even if a valid copy is there.

    Raises:
        ConfigError: the overrides do not compose.
        DatasetError, ArchiveError: the unpacked copy is broken, or an archive cannot be unpacked safely.
    """
    source = compose_data_source(overrides)
    dist = DISTRIBUTIONS.get(getattr(source, "option", ""))
    if dist is None:
        layout = getattr(source, "layout_help", "")
        what = f"Expected layout: {layout}." if layout else "It is generated or loaded on first use."
        print(f"{type(source).__name__} has nothing to download. {what}")
        return 0
    root = Path(source.root).expanduser()
    if info:
        print(describe_distribution(dist, root))
        _print_expected(source)
        return 0
    try:
        summary = download_and_prepare(
            source,
            dist,
            downloads=Path(downloads) if downloads else None,
            mirror=mirror,
            timeout=timeout,
            force=force,
        )
    except DownloadError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        if dist.variants:
            print("\nThe dataset could not be downloaded (no internet, or every source is gone). Get it by hand:\n")
        else:
            print("\nThis dataset cannot be downloaded automatically. Get it by hand:\n")
        print(describe_distribution(dist, root))
        _print_expected(source)
        return 1
    print(json.dumps(summary))
    return 0


def _print_expected(source: Any) -> None:
    expected: SplitCounts | None = getattr(source, "expected", None)
    if expected is not None:
        print(f"A complete copy has, under the standard split: {expected.describe()}.")
        print(f"Check it with: python scripts/check_data.py data={source.option} data.root={source.root}")


def make_tuples(
    overrides: Sequence[str], kind: str, count: int, out: str, seed: int = 0, holdout: float = 0.2
) -> dict[str, Any]:
    """Draws a pairs or triplets file from the labels of a dataset's training split and writes it to ``out``.

    A seeded ``holdout`` fraction of the training classes (at least two when above 0) is left out of every tuple,
    so that ``supervision=pairs | triplets`` can select checkpoints on labelled classes it never trained on. Under
    the ``closed_set`` protocol (the test images are of the training classes) it is a fraction of every training
    class's images instead, as the validation images of a labelled run are.

    Returns:
        What was written (printed as one JSON line by ``scripts/make_tuples.py``).

    Raises:
        ConfigError: a bad option or overrides that do not compose.
        DatasetError: the dataset has too few classes or images for the tuples asked.
    """
    import numpy as np

    from metricsearch.data.datamodule import split_validation_images
    from metricsearch.data.records import CLOSED_SET
    from metricsearch.data.tuples import HEADERS, dataset_root, format_tuples_csv, sample_tuples
    from metricsearch.utils.atomic_io import atomic_write_text

    if kind not in HEADERS:
        raise ConfigError(f"kind={kind} is not one of {', '.join(HEADERS)}")
    if count < 1:
        raise ConfigError(f"count={count} must be at least 1 (the number of {kind} to draw)")
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout={holdout} must be in [0, 1) (the fraction of training classes left out)")
    source = compose_data_source(overrides)
    split = source.load()
    records = split.train
    classes = records.classes
    held_out = np.array([], dtype=np.int64)
    if split.protocol == CLOSED_SET:
        used, held_images = split_validation_images(records, holdout, seed)
    else:
        if holdout > 0:
            held_out = np.random.default_rng([seed, 1]).permutation(classes)[: max(2, round(holdout * len(classes)))]
        is_held_out = np.isin(records.labels, held_out)
        used, held_images = records.select(~is_held_out), records.select(is_held_out)
    root = dataset_root(source)
    rows = sample_tuples(used, kind, count, seed, root)
    atomic_write_text(out, format_tuples_csv(kind, rows))
    return {
        "file": str(Path(out).resolve()),
        "kind": kind,
        "count": len(rows),
        "seed": seed,
        "root": str(root),
        "protocol": split.protocol,
        "training_classes": int(len(classes)),
        "classes_held_out": int(len(held_out)),
        "images_held_out": int(len(held_images)),
        "images_named": int(len({name for row in rows for name in row[: 2 if kind == "pairs" else 3]})),
    }
