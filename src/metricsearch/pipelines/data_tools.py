"""The dataset command lines: ``scripts/check_data.py`` and ``scripts/prepare_data.py``.

Both compose the same Hydra config as ``train.py``, so ``data=cub data.source.root=PATH`` (or the shorthand
``data.root=PATH``) means the same thing everywhere, and instantiate only ``data.source``: checking a dataset needs
neither torch nor a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException

from metricsearch.data.disk_source import DiskSource, SplitCounts, summarize, verify_images
from metricsearch.data.download import DISTRIBUTIONS, ArchiveError, DownloadError, describe_distribution
from metricsearch.data.download import prepare_dataset as download_and_prepare
from metricsearch.data.records import DatasetError
from metricsearch.utils.config import CONFIG_DIR, normalize_overrides

log = logging.getLogger(__name__)

ROOT_ALIAS = "data.root"
ROOT_KEY = "data.source.root"


def expand_data_root(overrides: Sequence[str]) -> list[str]:
    """Rewrite the shorthand ``data.root=PATH`` into ``data.source.root=PATH``.

    Every dataset reader takes its folder as ``root``, but it lives in the ``source`` node of the data config
    (the datamodule itself takes no root), and ``data.root`` is what a user types.
    """
    out = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        out.append(f"{ROOT_KEY}={value}" if sep and key.lstrip("+~") == ROOT_ALIAS else arg)
    return out


def compose_data_source(overrides: Sequence[str]) -> Any:
    """The ``data.source`` object that ``python train.py OVERRIDES`` would build."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=expand_data_root(normalize_overrides(list(overrides))))
    if "source" not in cfg.data:
        raise DatasetError(f"the data config {cfg.data.get('_target_')} has no `source` node to check")
    return instantiate(cfg.data.source)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides as for train.py, e.g. data=cub data.root=/data/CUB_200_2011",
    )
    return parser


def check_data(argv: Sequence[str] | None = None) -> int:
    """``scripts/check_data.py``: print one JSON line of counts, or one error line and a non-zero status.

    Exit status: 0 when the copy loads (a count mismatch with the complete dataset is a warning on stderr and
    ``"matches_expected": false`` in the JSON, unless ``--strict``); 1 when the copy is broken; 2 for a bad command
    line or config.
    """
    parser = _parser("Check a dataset copy: layout, annotations, image files, counts of the standard split.")
    parser.add_argument("--verify", action="store_true", help="decode every image (slow) and report the first bad one")
    parser.add_argument("--strict", action="store_true", help="fail when counts differ from the complete dataset")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        source = compose_data_source(args.overrides)
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as exc:
        print(f"error: bad configuration: {_one_line(exc)}", file=sys.stderr)
        return 2
    except DatasetError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    if isinstance(source, DiskSource):
        source.verify_images = source.verify_images or args.verify
        source.strict = source.strict or args.strict
    try:
        split = source.load()
        summary = summarize(source, split)
        if args.verify and not summary["images_verified"]:
            # Sources that are not DiskSources (built-in data) are verified here, with the same decoder.
            verify_images([*split.train.paths, *split.test.paths])
            summary["images_verified"] = True
    except DatasetError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def prepare_data(argv: Sequence[str] | None = None) -> int:
    """``scripts/prepare_data.py``: download, verify and unpack a dataset, or say where to get it.

    Exit status: 0 when the dataset is ready (or there is nothing to download, or ``--info``); 1 when it could not
    be downloaded (the sources and expected layout are printed) or the unpacked copy is broken; 2 for a bad command
    line or config.
    """
    parser = _parser("Download, verify (MD5) and unpack a dataset into data.source.root; --info only says how.")
    parser.add_argument("--info", action="store_true", help="print the sources and layout without downloading")
    parser.add_argument("--mirror", help="fetch every file from MIRROR/<filename> instead of the known sources")
    parser.add_argument("--downloads", type=Path, help="where archives are kept (default: downloads/ beside ROOT)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a connection or read")
    parser.add_argument("--force", action="store_true", help="download and unpack even if a valid copy is there")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        source = compose_data_source(args.overrides)
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as exc:
        print(f"error: bad configuration: {_one_line(exc)}", file=sys.stderr)
        return 2
    except DatasetError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    dist = DISTRIBUTIONS.get(getattr(source, "option", ""))
    if dist is None:
        layout = getattr(source, "layout_help", "")
        what = f"Expected layout: {layout}." if layout else "It is generated or loaded on first use."
        print(f"{type(source).__name__} has nothing to download. {what}")
        return 0
    root = Path(source.root).expanduser()
    if args.info:
        print(describe_distribution(dist, root))
        _print_expected(source)
        return 0
    try:
        summary = download_and_prepare(
            source, dist, downloads=args.downloads, mirror=args.mirror, timeout=args.timeout, force=args.force
        )
    except DownloadError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        print("\nThe dataset could not be downloaded (no internet, or every source is gone). Get it by hand:\n")
        print(describe_distribution(dist, root))
        _print_expected(source)
        return 1
    except (DatasetError, ArchiveError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def _print_expected(source: Any) -> None:
    expected: SplitCounts | None = getattr(source, "expected", None)
    if expected is not None:
        print(f"A complete copy has, under the standard split: {expected.describe()}.")
        print(f"Check it with: python scripts/check_data.py data={source.option} data.root={source.root}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
