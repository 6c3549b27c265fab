"""Fetching, verifying and unpacking the public datasets, and saying where to get them when that is impossible.

Each dataset lists the archives it is distributed as, every source known for them, and their MD5 where it is
known (the values the original distributions were published with, as checked by torchvision and
pytorch-metric-learning). A download goes to a temporary file that is renamed only once it is complete and its
checksum matches, so an interrupted or corrupted transfer never looks like a finished one. Archives are unpacked
into a staging folder next to the dataset and moved into place only when unpacking succeeded; members that would
land outside the target (absolute paths, ``..``, links) are refused. After unpacking, the dataset reader checks
the layout and counts, which is also how files without a known checksum are verified.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from metricsearch.data.disk_source import DiskSource, summarize
from metricsearch.data.records import DatasetError
from metricsearch.utils.atomic_io import atomic_path

log = logging.getLogger(__name__)

USER_AGENT = "MetricSearch-prepare_data/0.1 (+https://docs.python.org/3/library/urllib.request.html)"
CHUNK_SIZE = 1 << 20
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".tar.bz2", ".tar.xz", ".zip")


class DownloadError(RuntimeError):
    """No source of a file could be downloaded (each source's failure is in the message)."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the published checksum."""


class ArchiveError(RuntimeError):
    """An archive cannot be unpacked: it is damaged, or not an archive at all."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would be written outside the target folder (or is a link or device)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a distribution.

    Attributes:
        filename: Name under which it is stored (and looked for on a ``--mirror``).
        urls: Known sources, tried in order.
        md5: Published MD5, or None when none is known (then the layout check after unpacking is the only check).
        strip_prefix: Top folder of the archive whose content goes straight into the dataset folder.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    strip_prefix: str = ""

    @property
    def is_archive(self) -> bool:
        return self.filename.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class Distribution:
    """How a dataset is distributed.

    Attributes:
        name: Dataset name.
        homepage: The dataset's page.
        variants: Alternative sets of files; the first whose files all download is used.
        layout: What the dataset folder looks like once prepared.
        elsewhere: Other places to obtain it by hand, said honestly (accounts needed, unknown checksums).
    """

    name: str
    homepage: str
    variants: tuple[tuple[RemoteFile, ...], ...]
    layout: str
    elsewhere: tuple[str, ...] = ()


_CARS_OLD_HOSTS = ("https://ai.stanford.edu/~jkrause/car196/", "http://imagenet.stanford.edu/internal/car196/")

DISTRIBUTIONS: dict[str, Distribution] = {
    "cub": Distribution(
        name="CUB-200-2011",
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        variants=(
            (
                RemoteFile(
                    "CUB_200_2011.tgz",
                    (
                        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                        "http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/CUB_200_2011.tgz",
                    ),
                    md5="97eceeb196236b17998738112f37df78",
                    strip_prefix="CUB_200_2011/",
                ),
            ),
        ),
        layout="ROOT/images.txt, ROOT/image_class_labels.txt, ROOT/classes.txt, ROOT/images/001.Black_footed_Albatross/"
        "*.jpg ... (the CUB_200_2011 folder of the archive)",
        elsewhere=("CaltechDATA record https://data.caltech.edu/records/65de6-vp158 (the archive, 1.1 GB)",),
    ),
    "cars196": Distribution(
        name="Cars196 (Stanford Cars)",
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html (offline since 2023)",
        variants=(
            (
                RemoteFile(
                    "car_ims.tgz",
                    tuple(h + "car_ims.tgz" for h in _CARS_OLD_HOSTS),
                    md5="d5c8f0aa497503f355e17dc7886c3f14",
                ),
                RemoteFile(
                    "cars_annos.mat",
                    tuple(h + "cars_annos.mat" for h in _CARS_OLD_HOSTS),
                    md5="b407c6086d669747186bd1d764ff9dbc",
                ),
            ),
            (
                RemoteFile(
                    "car_devkit.tgz",
                    ("https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz",),
                    md5="c3b158d763b6e2245038c8ad08e45376",
                ),
                RemoteFile(
                    "cars_train.tgz",
                    tuple(h + "cars_train.tgz" for h in _CARS_OLD_HOSTS),
                    md5="065e5b463ae28d29e77c1b4b166cfe61",
                ),
                RemoteFile(
                    "cars_test.tgz",
                    tuple(h + "cars_test.tgz" for h in _CARS_OLD_HOSTS),
                    md5="4ce7ebf6a94d07f1952d94dd34c4d501",
                ),
                RemoteFile(
                    "cars_test_annos_withlabels.mat",
                    tuple(h + "cars_test_annos_withlabels.mat" for h in _CARS_OLD_HOSTS),
                    md5="b0a2b23655a3edd16d84508592a98d10",
                ),
            ),
        ),
        layout="either ROOT/car_ims/000001.jpg ... + ROOT/cars_annos.mat, or ROOT/cars_train/, ROOT/cars_test/, "
        "ROOT/devkit/cars_meta.mat, ROOT/devkit/cars_train_annos.mat and ROOT/cars_test_annos_withlabels.mat",
        elsewhere=(
            "the original Stanford hosts above have answered 404 since 2023 (pytorch/vision#7545); they are still "
            "tried in case they return",
            "Kaggle dataset jessicali9530/stanford-cars-dataset (needs a Kaggle account; its cars_train/cars_train/ "
            "nesting is understood; it lacks the devkit .mat files, which pytorch/vision#7545 links)",
            "no checksum is known for these mirrors: `python scripts/check_data.py data=cars196` verifies the layout "
            "and counts after unpacking",
        ),
    ),
    "sop": Distribution(
        name="Stanford Online Products",
        homepage="https://cvgl.stanford.edu/projects/lifted_struct/",
        variants=(
            (
                RemoteFile(
                    "Stanford_Online_Products.zip",
                    (
                        "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                        "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                    ),
                    md5="7f73d41a2f44250d4779881525aea32e",
                    strip_prefix="Stanford_Online_Products/",
                ),
            ),
        ),
        layout="ROOT/Ebay_train.txt, ROOT/Ebay_test.txt, ROOT/Ebay_info.txt, ROOT/bicycle_final/*.JPG ... "
        "(the Stanford_Online_Products folder of the archive)",
        elsewhere=("the project page above links the archive",),
    ),
    "cifar10": Distribution(
        name="CIFAR-10",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        variants=(
            (
                RemoteFile(
                    "cifar-10-python.tar.gz",
                    ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                    md5="c58f30108f718f92721af3b95e74349a",
                    strip_prefix="cifar-10-batches-py/",
                ),
            ),
        ),
        layout="ROOT/data_batch_1 ... ROOT/data_batch_5, ROOT/test_batch, ROOT/batches.meta (the cifar-10-batches-py "
        "folder of the archive; the images are written once as PNG files into ROOT/cifar10-png-v1/ on first use)",
        elsewhere=("the page above links the archive (the 'CIFAR-10 python version', 163 MB)",),
    ),
    "cifar100": Distribution(
        name="CIFAR-100",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        variants=(
            (
                RemoteFile(
                    "cifar-100-python.tar.gz",
                    ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                    md5="eb9058c3a382ffc7106e4002c42a8d85",
                    strip_prefix="cifar-100-python/",
                ),
            ),
        ),
        layout="ROOT/train, ROOT/test, ROOT/meta (the cifar-100-python folder of the archive; the images are written "
        "once as PNG files into ROOT/cifar100-png-v1/ on first use)",
        elsewhere=("the page above links the archive (the 'CIFAR-100 python version', 161 MB)",),
    ),
    # No variants: the files sit in a Google Drive folder that the project page opens only after a form.
    "inshop": Distribution(
        name="DeepFashion In-Shop Clothes Retrieval",
        homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        variants=(),
        layout="ROOT/Eval/list_eval_partition.txt and ROOT/img/WOMEN/Dresses/id_00000002/02_1_front.jpg ... "
        "(Img/img.zip unpacked beside Eval/; ROOT/Img/img/... is found too)",
        elsewhere=(
            "the page above links the dataset's Google Drive folder after a short agreement form; from its "
            "'In-shop Clothes Retrieval Benchmark' folder take Img/img.zip and "
            "Eval/list_eval_partition.txt (no published checksum: check_data checks the layout and counts)",
        ),
    ),
}


def describe_distribution(dist: Distribution, root: Path) -> str:
    """Where each file can be obtained and the layout expected, for a user without (working) internet."""
    layout = dist.layout.replace("ROOT", str(root))
    lines = [f"{dist.name}: {dist.homepage}", f"Put it in {root} so that it holds {layout}."]
    for number, variant in enumerate(dist.variants, start=1):
        heading = f"Files (option {number} of {len(dist.variants)}):" if len(dist.variants) > 1 else "Files:"
        lines.append(heading)
        for remote in variant:
            checksum = f"md5 {remote.md5}" if remote.md5 else "no published checksum"
            lines.append(f"  {remote.filename} ({checksum})")
            lines += [f"    {url}" for url in remote.urls]
    if dist.elsewhere:
        lines.append("Also:")
        lines += [f"  - {note}" for note in dist.elsewhere]
    return "\n".join(lines)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Progress:
    """A one-line progress display on stderr: rewritten in place on a terminal, one line per 10% in a log."""

    def __init__(self, name: str, total: int | None, enabled: bool) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.started = time.perf_counter()
        self.last_shown = 0.0
        self.last_step: int | None = None
        self.tty = sys.stderr.isatty()

    def update(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-6)
        if self.tty:
            if not final and elapsed - self.last_shown < 0.5:
                return
        else:
            # In a log file: a line at every tenth of the transfer, or only the total when the size is unknown.
            step = int(10 * done / self.total) if self.total else -1
            if step == self.last_step or (not self.total and not final):
                return
            self.last_step = step
        self.last_shown = elapsed
        if self.total:
            amount = f"{done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB ({100 * done / self.total:.0f}%)"
        else:
            amount = f"{done / 1e6:,.1f} MB"
        line = f"  {self.name}: {amount} at {done / elapsed / 1e6:.1f} MB/s"
        if self.tty:
            print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def download_file(
    url: str, dest: Path, *, md5: str | None = None, timeout: float = 60.0, progress: bool = True
) -> Path:
    """Download ``url`` to ``dest``: streamed to a temporary file, checked, then renamed into place.

    Args:
        url: http(s), ftp or file URL.
        dest: Final path; its folder is created.
        md5: Expected MD5; a mismatch raises and leaves nothing behind.
        timeout: Seconds to wait for the connection and for each read.
        progress: Show progress on stderr.

    Raises:
        ChecksumError: The content does not match ``md5``.
        urllib.error.URLError, OSError: The transfer failed (no network, HTTP error, timeout).
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(request, timeout=timeout) as response, atomic_path(dest) as tmp:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        meter = _Progress(dest.name, total, progress)
        done = 0
        with open(tmp, "wb") as out:
            while chunk := response.read(CHUNK_SIZE):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                meter.update(done)
        meter.update(done, final=True)
        if total is not None and done != total:
            raise DownloadError(f"{url}: the transfer stopped after {done:,} of {total:,} bytes")
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise ChecksumError(
                f"{url}: MD5 {digest.hexdigest()} does not match the published {md5} (a corrupted transfer, or a "
                "mirror serving another file); the download was discarded"
            )
    return dest


def fetch(
    remote: RemoteFile, downloads: Path, *, mirror: str | None = None, timeout: float = 60.0, progress: bool = True
) -> Path:
    """The local copy of ``remote`` in ``downloads``, downloaded from the first source that works.

    A file already there is reused when its checksum matches (or none is known: it was renamed into place only
    after a complete transfer). With ``mirror``, only ``<mirror>/<filename>`` is tried instead of the known sources.

    Raises:
        DownloadError: Every source failed; the message lists each failure.
    """
    dest = downloads / remote.filename
    if dest.is_file():
        if remote.md5 is None or file_md5(dest) == remote.md5:
            log.info("using the downloaded %s", dest)
            return dest
        log.warning("%s does not have the published checksum; downloading it again", dest)
    urls = (f"{mirror.rstrip('/')}/{remote.filename}",) if mirror else remote.urls
    failures = []
    for url in urls:
        log.info("downloading %s", url)
        try:
            return download_file(url, dest, md5=remote.md5, timeout=timeout, progress=progress)
        except (urllib.error.URLError, OSError, DownloadError, ValueError) as exc:
            # ValueError: a malformed URL; URLError covers HTTP errors, refused connections and DNS failures.
            reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or exc
            failures.append(f"{url}: {reason}")
            log.warning("could not download %s (%s)", url, reason)
    raise DownloadError(f"could not download {remote.filename}: " + "; ".join(failures))


def _member_target(name: str, strip_prefix: str, archive: Path) -> str | None:
    """The relative path an archive member is written to, None to skip it; raises for paths escaping the target."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    clean = posixpath.normpath(clean)
    if clean == ".." or clean.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the target folder; refusing to extract")
    parts = clean.split("/")
    # macOS metadata, not data: resource forks ("._x.jpg"), Finder files and the __MACOSX tree of Mac-made zips.
    if "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store" or clean == ".":
        return None
    if strip_prefix:
        prefix = strip_prefix.rstrip("/")
        if clean == prefix:
            return None
        if clean.startswith(prefix + "/"):
            clean = clean[len(prefix) + 1 :]
    return clean


def _write_member(source: IO[bytes], target: Path, relative: str) -> None:
    dest = target / relative
    if not dest.resolve().is_relative_to(target.resolve()):
        raise UnsafeArchiveError(f"member {relative!r} resolves outside {target}; refusing to extract")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK_SIZE)


def extract_archive(archive: Path, target: Path, *, strip_prefix: str = "") -> int:
    """Unpack a tar (any compression) or zip archive into ``target``; returns the number of files written.

    Only regular files and folders are unpacked. Links, devices and members whose path is absolute or climbs out
    with ``..`` raise :class:`UnsafeArchiveError`: none of the dataset archives holds such members, so one
    that does is damaged or malicious.
    """
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, target, strip_prefix)
        return _extract_tar(archive, target, strip_prefix)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ArchiveError(f"{archive} is damaged or not an archive ({exc}); delete it and download it again") from exc


def _extract_zip(archive: Path, target: Path, strip_prefix: str) -> int:
    written = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            relative = _member_target(info.filename, strip_prefix, archive)
            if relative is None:
                continue
            # Unix file type bits live in the high half of external_attr; 0o120000 marks a symbolic link.
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a link; refusing to extract")
            if info.is_dir():
                (target / relative).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as source:
                _write_member(source, target, relative)
            written += 1
    return written


def _extract_tar(archive: Path, target: Path, strip_prefix: str) -> int:
    written = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            relative = _member_target(member.name, strip_prefix, archive)
            if relative is None:
                continue
            if member.isdir():
                (target / relative).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                kind = "a link" if member.issym() or member.islnk() else "not a regular file"
                raise UnsafeArchiveError(f"{archive}: member {member.name!r} is {kind}; refusing to extract")
            source = tar.extractfile(member)
            if source is None:
                raise UnsafeArchiveError(f"{archive}: member {member.name!r} has no content")
            with source:
                _write_member(source, target, relative)
            written += 1
    return written


def install(files: Sequence[tuple[RemoteFile, Path]], root: Path) -> None:
    """Unpack archives and copy plain files into ``root``, through a staging folder next to it.

    Everything is first unpacked into ``.<root name>.partial``; only then is each top-level entry moved into
    ``root``, replacing an entry of the same name. An interrupted run therefore leaves the staging folder (wiped
    on the next run), not a half-unpacked dataset that looks complete.
    """
    root = root.expanduser()
    staging = root.parent / f".{root.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for remote, local in files:
        if remote.is_archive:
            log.info("unpacking %s", local.name)
            count = extract_archive(local, staging, strip_prefix=remote.strip_prefix)
            log.info("unpacked %d files from %s", count, local.name)
        else:
            shutil.copyfile(local, staging / remote.filename)
    root.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        dest = root / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        shutil.move(entry, dest)  # a rename, unless root is a link to another file system
    staging.rmdir()


def prepare_dataset(
    source: DiskSource,
    dist: Distribution,
    *,
    downloads: Path | None = None,
    mirror: str | None = None,
    timeout: float = 60.0,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Make ``source.root`` hold a checked copy of the dataset: download, verify, unpack, then load it.

    Args:
        source: The reader of the dataset (its ``root`` is where the dataset goes).
        dist: The dataset's distribution (files, sources, checksums).
        downloads: Where archives are kept; default: ``downloads/`` next to the dataset folder.
        mirror: Fetch every file from ``<mirror>/<filename>`` instead of the known sources.
        timeout: Seconds to wait for a connection or a read.
        force: Download and unpack even if a valid copy is already there.
        progress: Show download progress on stderr.

    Returns:
        The summary of the prepared copy (see :func:`~metricsearch.data.disk_source.summarize`) with ``status``.

    Raises:
        DownloadError: No variant of the distribution could be downloaded completely.
        DatasetError: The unpacked copy does not have the expected layout.
    """
    root = Path(source.root).expanduser()
    if not force:
        try:
            existing = source.fresh()
            return {**summarize(existing, existing.load()), "status": "already prepared"}
        except DatasetError as exc:
            log.info("no usable copy in %s yet, downloading (%s)", root, exc)
    if not dist.variants:
        raise DownloadError(f"{dist.name} cannot be downloaded automatically; get it from {dist.homepage}")
    downloads = downloads or root.parent / "downloads"
    failures = []
    for variant in dist.variants:
        try:
            files = [
                (remote, fetch(remote, downloads, mirror=mirror, timeout=timeout, progress=progress))
                for remote in variant
            ]
        except DownloadError as exc:
            failures.append(str(exc))
            continue
        install(files, root)
        prepared = source.fresh()
        return {**summarize(prepared, prepared.load()), "status": "downloaded", "archives": str(downloads)}
    raise DownloadError(f"{dist.name} could not be downloaded: " + " | ".join(failures))
