"""Command lines of the dataset tools: ``scripts/check_data.py`` and ``scripts/prepare_data.py``.

Both take the training config's overrides (``data=cub data.root=PATH``, composed as ``train.py`` composes them)
next to their own options; the work is in :mod:`metricsearch.pipelines.data_tools`.
"""

from __future__ import annotations

from collections.abc import Sequence

from metricsearch.cli.args import Arguments, Command, Option, PassedOn, run_command
from metricsearch.data.download import ArchiveError
from metricsearch.data.records import DatasetError
from metricsearch.utils.config import ConfigError

# Any key the command does not define is an override of the training config.
TRAINING_OVERRIDES = PassedOn(
    ("",),
    (
        (
            "data=NAME",
            "the dataset: a conf/data option (cub, cars196, sop, inshop, cifar10, cifar100, folder, synthetic)",
        ),
        ("data.root=PATH", "its folder (short for data.source.root)"),
        ("KEY=VALUE", "any other override of the training config, as train.py takes it"),
    ),
)
# check_data: a config that does not compose and a broken dataset copy are both bad input, one line, status 2.
CHECK_DATA_ERRORS = {ConfigError: 2, DatasetError: 2}
# prepare_data: a config that does not compose is a usage error (2); a download or unpacking that failed, 1.
DATA_ERRORS = {ConfigError: 2, DatasetError: 1, ArchiveError: 1}

CHECK_DATA = Command(
    name="check_data",
    summary=(
        "Check a dataset copy: layout, annotations, image files, counts of the standard split. Prints one JSON line "
        "and exits 0 when the copy loads (a count that differs from the complete dataset is a warning, unless "
        "strict=true), or one line naming what is broken and exits 2."
    ),
    options={
        "verify": Option(False, "decode every image (slow) and report the first bad one"),
        "strict": Option(False, "fail when counts differ from the complete dataset"),
    },
    passed_on=TRAINING_OVERRIDES,
)


def _check_data(args: Arguments) -> None:
    from metricsearch.pipelines.data_tools import check_data

    check_data(args.overrides, verify=args["verify"], strict=args["strict"])


def main_check_data(argv: Sequence[str] | None = None) -> int:
    """``scripts/check_data.py``."""
    return run_command(CHECK_DATA, argv, _check_data, CHECK_DATA_ERRORS)


PREPARE_DATA = Command(
    name="prepare_data",
    summary=(
        "Download, verify (MD5) and unpack a dataset into data.source.root, then check its layout and counts; "
        "info=true only says where to get it and the layout expected. Exit status 1 when it could not be "
        "downloaded (the sources and layout are printed) or the unpacked copy is broken."
    ),
    options={
        "info": Option(False, "print the sources and layout without downloading"),
        "mirror": Option(None, "fetch every file from MIRROR/<filename> instead of the known sources"),
        "downloads": Option(None, "where archives are kept (default: downloads/ beside the data root)"),
        "timeout": Option(60.0, "seconds to wait for a connection or read"),
        "force": Option(False, "download and unpack even if a valid copy is there"),
    },
    passed_on=TRAINING_OVERRIDES,
)


def _prepare_data(args: Arguments) -> int:
    from metricsearch.pipelines.data_tools import prepare_data

    return prepare_data(
        args.overrides,
        info=args["info"],
        mirror=args["mirror"],
        downloads=args["downloads"],
        timeout=args["timeout"],
        force=args["force"],
    )


def main_prepare_data(argv: Sequence[str] | None = None) -> int:
    """``scripts/prepare_data.py``."""
    return run_command(PREPARE_DATA, argv, _prepare_data, DATA_ERRORS)


MAKE_TUPLES = Command(
    name="make_tuples",
    summary=(
        "Draw a pairs or triplets CSV for supervision=pairs | triplets from a labelled dataset's training split "
        "(seeded; paths relative to the data root; a held-out fraction of the training classes, or under the "
        "closed-set protocol of every class's training images, is named by no tuple, for checkpoint selection). "
        "Prints one JSON line saying what was written."
    ),
    options={
        "kind": Option(
            None, "pairs (half same, half different) or triplets (anchor, positive, negative)", type=str, required=True
        ),
        "count": Option(None, "how many distinct tuples to draw", type=int, required=True),
        "out": Option(None, "the CSV to write", type=str, required=True),
        "seed": Option(0, "seed of the held-out classes (or images) and of the draw"),
        "holdout": Option(
            0.2, "fraction of the training classes that no tuple names (closed set: of every class's images; 0: none)"
        ),
    },
    passed_on=TRAINING_OVERRIDES,
)


def _make_tuples(args: Arguments) -> None:
    import json

    from metricsearch.pipelines.data_tools import make_tuples

    written = make_tuples(
        args.overrides, args["kind"], args["count"], args["out"], seed=args["seed"], holdout=args["holdout"]
    )
    print(json.dumps(written))


def main_make_tuples(argv: Sequence[str] | None = None) -> int:
    """``scripts/make_tuples.py``."""
    return run_command(MAKE_TUPLES, argv, _make_tuples, DATA_ERRORS)
