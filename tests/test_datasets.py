"""CUB, Cars196, SOP and image-folder readers on fabricated miniature copies: split counts, labels, paths, and every
kind of bad input named; check_data / prepare_data; one short training run."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hydra.utils import instantiate
from PIL import Image

from metricsearch.cli.data import main_check_data as check_data
from metricsearch.cli.data import main_prepare_data as prepare_data
from metricsearch.data.cars import Cars196Source
from metricsearch.data.cub import CUBSource
from metricsearch.data.dataset import ImageDataset
from metricsearch.data.disk_source import SplitCounts, find_missing_files
from metricsearch.data.download import (
    ChecksumError,
    Distribution,
    DownloadError,
    RemoteFile,
    UnsafeArchiveError,
    download_file,
    extract_archive,
    fetch,
    prepare_dataset,
)
from metricsearch.data.folder import FolderSource
from metricsearch.data.io import ImageLoadError
from metricsearch.data.records import DatasetError
from metricsearch.data.samplers import MPerClassBatchSampler, SamplerConfigError
from metricsearch.data.sop import SOPSource
from metricsearch.data.transforms import build_eval_transform
from metricsearch.utils.config import normalize_overrides
from tests.dataset_fixtures import (
    copy_tree,
    cub_folder_name,
    make_cars_devkit,
    make_cars_flat,
    make_cub,
    make_folder,
    make_sop,
    write_image,
    write_lines,
)
from tests.helpers import REPO_ROOT, compose_config

# --- miniature copies shared by the whole session (tests that damage one work on a copy_tree of it) ---


@pytest.fixture(scope="session")
def cub_copy(tmp_path_factory) -> tuple[Path, SplitCounts]:
    root = tmp_path_factory.mktemp("cub") / "CUB_200_2011"
    return root, make_cub(root)


@pytest.fixture(scope="session")
def cars_flat_copy(tmp_path_factory) -> tuple[Path, SplitCounts]:
    root = tmp_path_factory.mktemp("cars_flat") / "cars196"
    return root, make_cars_flat(root)


@pytest.fixture(scope="session")
def cars_devkit_copy(tmp_path_factory) -> tuple[Path, SplitCounts]:
    root = tmp_path_factory.mktemp("cars_devkit") / "stanford_cars"
    return root, make_cars_devkit(root)


@pytest.fixture(scope="session")
def sop_copy(tmp_path_factory) -> tuple[Path, SplitCounts]:
    root = tmp_path_factory.mktemp("sop") / "Stanford_Online_Products"
    return root, make_sop(root)


@pytest.fixture(scope="session")
def folder_copy(tmp_path_factory) -> tuple[Path, SplitCounts]:
    root = tmp_path_factory.mktemp("folder") / "images"
    return root, make_folder(root)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# --- CUB-200-2011 ---


def test_cub_standard_split_labels_and_paths(cub_copy):
    root, expected = cub_copy
    source = CUBSource(root)
    split = source.load()
    assert SplitCounts.of(split) == expected == SplitCounts(200, 200, 100, 100)
    assert split.train.labels.min() == 1 and split.train.labels.max() == 100
    assert split.test.labels.min() == 101 and split.test.labels.max() == 200
    assert split.train.class_names[1] == "Bird_number_1" and split.test.class_names[200] == "Bird_number_200"
    # Images in images.txt order, under images/; the macOS ._ files beside them are not images of the dataset.
    assert split.train.paths[0] == root / "images" / cub_folder_name(1) / "Bird_Number_1_0000_1.jpg"
    assert not any(p.name.startswith("._") for p in [*split.train.paths, *split.test.paths])
    assert find_missing_files([*split.train.paths, *split.test.paths]) == []
    assert source.layout == "CUB_200_2011" and source.dataset_dir == root


def test_cub_is_found_inside_the_folder_it_was_extracted_into(cub_copy):
    root, expected = cub_copy
    source = CUBSource(root.parent)
    assert SplitCounts.of(source.load()) == expected
    assert source.dataset_dir == root


def test_count_mismatch_is_a_warning_by_default_and_an_error_when_strict(cub_copy, caplog):
    root, _ = cub_copy
    with caplog.at_level(logging.WARNING):
        CUBSource(root).load()
    assert "found train 200 images / 100 classes" in caplog.text and "expected train 5,864 images" in caplog.text
    with pytest.raises(DatasetError, match=r"found train 200 images.*expected train 5,864 images.*strict=false"):
        CUBSource(root, strict=True).load()


def test_cub_missing_annotation_file_is_named(cub_copy, tmp_path):
    root = copy_tree(cub_copy[0], tmp_path / "CUB_200_2011")
    (root / "images.txt").unlink()
    with pytest.raises(DatasetError, match=r"images\.txt is missing; expected layout: images\.txt, image_class"):
        CUBSource(root).load()


def test_missing_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist; `python scripts/prepare_data.py data=cub`"):
        CUBSource(tmp_path / "nowhere").load()


def test_cub_missing_image_is_named(cub_copy, tmp_path):
    root = copy_tree(cub_copy[0], tmp_path / "CUB_200_2011")
    (root / "images" / cub_folder_name(150) / "Bird_Number_150_0001_300.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 400 listed images are missing, e.g. images/150\.Bird_number_150/"):
        CUBSource(root).load()


def test_cub_empty_class_and_inconsistent_annotations_are_named(cub_copy, tmp_path):
    root = copy_tree(cub_copy[0], tmp_path / "CUB_200_2011")
    images, labels = _lines(root / "images.txt"), _lines(root / "image_class_labels.txt")
    keep = [i for i, line in enumerate(labels) if line.split()[1] != "7"]
    write_lines(root / "images.txt", [images[i] for i in keep])
    write_lines(root / "image_class_labels.txt", [labels[i] for i in keep])
    with pytest.raises(DatasetError, match=r"class 7 \(007\.Bird_number_7\) of classes\.txt has no images"):
        CUBSource(root).load()
    write_lines(root / "image_class_labels.txt", [labels[i] for i in keep[1:]])
    with pytest.raises(DatasetError, match=r"1 image ids of images\.txt have no class in image_class_labels\.txt"):
        CUBSource(root).load()
    write_lines(root / "image_class_labels.txt", ["1 one", *[labels[i] for i in keep[1:]]])
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt line 1: the class id should be an integer"):
        CUBSource(root).load()


def test_truncated_jpeg_is_named_with_verify_and_at_training_time(cub_copy, tmp_path):
    root = copy_tree(cub_copy[0], tmp_path / "CUB_200_2011")
    broken = root / "images" / cub_folder_name(3) / "Bird_Number_3_0000_5.jpg"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])
    split = CUBSource(root).load()  # existence checks only: the cheap default
    with pytest.raises(
        ImageLoadError, match=r"1 of 400 images .* cannot be decoded; the first: .*Bird_Number_3_0000_5"
    ):
        CUBSource(root, verify_images=True).load()
    dataset = ImageDataset(split.train, build_eval_transform(16))
    with pytest.raises(ImageLoadError, match="Bird_Number_3_0000_5.jpg"):
        dataset[split.train.paths.index(broken)]


# --- Cars196 ---


def test_cars_mat_fixture_has_the_structure_of_the_real_file(cars_flat_copy):
    annotations = scipy.io.loadmat(cars_flat_copy[0] / "cars_annos.mat")["annotations"][0]
    assert annotations[0][0][0] == "car_ims/000001.jpg" and annotations[0][5][0][0] == 1
    assert annotations.dtype.names[:2] == ("relative_im_path", "bbox_x1")


def test_cars_flat_layout(cars_flat_copy):
    root, expected = cars_flat_copy
    source = Cars196Source(root)
    split = source.load()
    assert SplitCounts.of(split) == expected == SplitCounts(196, 196, 98, 98)
    assert source.layout == "car_ims + cars_annos.mat"
    assert set(split.train.labels.tolist()) == set(range(1, 99)) and set(split.test.labels.tolist()) == set(
        range(99, 197)
    )
    assert split.train.paths[0] == root / "car_ims" / "000001.jpg"
    assert split.test.class_names[99] == "Maker Model 99 Sedan 2012"


def test_cars_devkit_layout_merges_both_halves_before_splitting_by_class(cars_devkit_copy):
    root, expected = cars_devkit_copy
    source = Cars196Source(root)
    split = source.load()
    assert SplitCounts.of(split) == expected
    assert source.layout.startswith("devkit")
    # Every class has one image in each half; both halves feed both sides of the split by class.
    for records in (split.train, split.test):
        assert {p.parent.name for p in records.paths} == {"cars_train", "cars_test"}
    assert np.all(split.train.labels <= 98) and np.all(split.test.labels >= 99)


def test_cars_devkit_kaggle_nesting(tmp_path):
    expected = make_cars_devkit(tmp_path / "cars", nested=True)
    split = Cars196Source(tmp_path / "cars").load()
    assert SplitCounts.of(split) == expected
    assert split.train.paths[0].parent == tmp_path / "cars" / "cars_train" / "cars_train"


def test_cars_devkit_needs_the_test_labels(cars_devkit_copy, tmp_path):
    root = copy_tree(cars_devkit_copy[0], tmp_path / "cars")
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match=r"needs cars_test_annos_withlabels\.mat .*has no class labels"):
        Cars196Source(root).load()
    # The public test annotations renamed into place: read by field name, the missing 'class' is named.
    (root / "cars_test_annos_withlabels.mat").write_bytes((root / "devkit" / "cars_test_annos.mat").read_bytes())
    with pytest.raises(DatasetError, match=r"has no field 'class'"):
        Cars196Source(root).load()


def test_cars_layout_problems_are_named(cars_flat_copy, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("?")
    with pytest.raises(DatasetError, match=r"no known layout .*readme\.txt.*car_ims/\*\.jpg \+ cars_annos\.mat, or"):
        Cars196Source(tmp_path / "empty").load()
    root = copy_tree(cars_flat_copy[0], tmp_path / "cars")
    (root / "car_ims" / "000005.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 392 listed images are missing, e.g. car_ims/000005\.jpg"):
        Cars196Source(root).load()
    (root / "cars_annos.mat").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DatasetError, match=r"cars_annos\.mat cannot be read as a MATLAB file"):
        Cars196Source(root).load()


# --- Stanford Online Products ---


def test_sop_split_from_its_lists(sop_copy):
    root, expected = sop_copy
    split = SOPSource(root.parent).load()  # the archive's Stanford_Online_Products folder is found
    assert SplitCounts.of(split) == expected
    assert split.train.paths[0] == root / "bicycle_final" / "111000000001_0.JPG"
    assert split.train.labels.max() <= 11318 and split.test.labels.min() >= 11319
    assert split.test.class_names[11319] == "bicycle/111000011319"


def test_sop_header_and_lists_are_checked(sop_copy, tmp_path):
    root = copy_tree(sop_copy[0], tmp_path / "sop")
    write_lines(root / "Ebay_test.txt", _lines(root / "Ebay_test.txt")[1:])
    with pytest.raises(DatasetError, match=r"first line of .*Ebay_test\.txt should be the header 'image_id class_id"):
        SOPSource(root).load()
    (root / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetError, match=r"Ebay_test\.txt is missing"):
        SOPSource(root).load()


def test_sop_two_image_classes_rule_out_the_default_m4(sop_copy):
    labels = SOPSource(sop_copy[0]).load().train.labels
    with pytest.raises(SamplerConfigError, match="replacement=true"):
        MPerClassBatchSampler(labels, batch_size=8, m=4)
    assert len(list(MPerClassBatchSampler(labels, batch_size=8, m=2))) > 0


# --- image folders ---


def test_folder_split_by_sorted_class_names_skips_junk(folder_copy, caplog):
    root, expected = folder_copy
    with caplog.at_level(logging.WARNING):
        split = FolderSource(root).load()
    assert SplitCounts.of(split) == expected
    assert split.train.class_names == {0: "class_00", 1: "class_01", 2: "class_02", 3: "class_03"}
    assert {p.suffix for p in [*split.train.paths, *split.test.paths]} == {".jpg"}
    assert not any(p.name.startswith(".") for p in split.train.paths)
    assert "notes.txt" in caplog.text
    assert SplitCounts.of(FolderSource(root, train_fraction=0.75).load()) == SplitCounts(18, 6, 6, 2)


def test_folder_with_train_and_test_folders(tmp_path):
    make_folder(tmp_path / "train", num_classes=3)
    make_folder(tmp_path / "test", num_classes=2)
    with pytest.raises(DatasetError, match=r"class 'class_00' is in both train/ and test/"):
        FolderSource(tmp_path).load()
    (tmp_path / "test" / "class_00").rename(tmp_path / "test" / "class_10")
    (tmp_path / "test" / "class_01").rename(tmp_path / "test" / "class_11")
    split = FolderSource(tmp_path).load()
    assert SplitCounts.of(split) == SplitCounts(9, 6, 3, 2)
    assert split.test.class_names == {3: "class_10", 4: "class_11"}


def test_folder_empty_class_and_missing_root(folder_copy, tmp_path):
    root = copy_tree(folder_copy[0], tmp_path / "images")
    (root / "class_05" / "empty").mkdir(parents=True, exist_ok=True)
    for image in (root / "class_05").glob("*.jpg"):
        image.unlink()
    with pytest.raises(DatasetError, match=r"class folder .*class_05 has no images"):
        FolderSource(root).load()
    with pytest.raises(DatasetError, match="does not exist"):
        FolderSource(tmp_path / "missing").load()


def test_grayscale_cmyk_and_transparent_images_become_rgb(tmp_path):
    write_image(tmp_path / "a" / "gray.jpg", 1, mode="L")
    write_image(tmp_path / "a" / "cmyk.jpg", 2, mode="CMYK")
    write_image(tmp_path / "b" / "alpha.png", 3, mode="RGBA", fmt="PNG")
    write_image(tmp_path / "b" / "palette.png", 4, mode="P", fmt="PNG")
    assert Image.open(tmp_path / "a" / "cmyk.jpg").mode == "CMYK"
    split = FolderSource(tmp_path, verify_images=True).load()
    assert split.train.paths and split.test.paths
    for records in (split.train, split.test):
        dataset = ImageDataset(records, build_eval_transform(16))
        assert all(dataset[i]["image"].shape == (3, 16, 16) for i in range(len(dataset)))


# --- scripts/check_data.py ---

FORMATS = {
    "cub": "cub_copy",
    "cars196": "cars_flat_copy",
    "sop": "sop_copy",
    "folder": "folder_copy",
}


@pytest.mark.parametrize("option", [*FORMATS, "cars196-devkit"])
def test_check_data_prints_the_counts(option, request, capsys):
    name = option.split("-")[0]
    root, expected = request.getfixturevalue("cars_devkit_copy" if option == "cars196-devkit" else FORMATS[option])
    assert check_data([f"data={name}", f"data.root={root}", "--verify"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    summary = json.loads(out[0])
    assert {k: summary[k] for k in expected.as_dict()} == expected.as_dict()
    assert summary["images_verified"] is True
    assert summary["matches_expected"] is (None if name == "folder" else False)


def test_check_data_names_what_is_broken_in_one_line(cub_copy, tmp_path, capsys):
    root = copy_tree(cub_copy[0], tmp_path / "CUB_200_2011")
    assert check_data(["data=cub", f"data.root={root}", "--strict"]) == 2
    assert "expected train 5,864 images" in capsys.readouterr().err
    broken = root / "images" / cub_folder_name(120) / "Bird_Number_120_0000_239.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert check_data(["data=cub", f"data.root={root}"]) == 0
    capsys.readouterr()
    assert check_data(["data=cub", f"data.root={root}", "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Bird_Number_120_0000_239.jpg" in err[0]
    (root / "image_class_labels.txt").unlink()
    assert check_data(["data=cub", f"data.root={root}"]) == 2
    assert "image_class_labels.txt is missing" in capsys.readouterr().err
    assert check_data(["data=no_such_dataset"]) == 2


def test_check_data_script_runs(sop_copy):
    result = subprocess.run(
        [sys.executable, "scripts/check_data.py", "data=sop", f"data.root={sop_copy[0]}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["test_images"] == sop_copy[1].test_images
    assert "is not the complete dataset" in result.stderr


def test_data_root_shorthand():
    assert normalize_overrides(["data=cub", "data.root=/x y", "data.source.root=/z", "+data.root=/w"]) == [
        "data=cub",
        "data.source.root=/x y",
        "data.source.root=/z",
        "data.source.root=/w",
    ]


# --- scripts/prepare_data.py: download, checksum, safe extraction (a local HTTP server, never the network) ---


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    folder = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_download_checks_the_md5_and_leaves_no_partial_file(http_root, tmp_path):
    served, url = http_root
    payload = os.urandom(3 << 20)
    (served / "blob.bin").write_bytes(payload)
    dest = download_file(f"{url}/blob.bin", tmp_path / "dl" / "blob.bin", md5=_md5(payload), progress=True)
    assert dest.read_bytes() == payload
    with pytest.raises(ChecksumError, match="does not match the published"):
        download_file(f"{url}/blob.bin", tmp_path / "dl" / "other.bin", md5="0" * 32)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["blob.bin"]


def test_fetch_tries_each_source_and_reports_every_failure(http_root, tmp_path):
    served, url = http_root
    (served / "f.mat").write_bytes(b"content")
    remote = RemoteFile(
        "f.mat", (_closed_port_url() + "/f.mat", f"{url}/missing.mat", f"{url}/f.mat"), _md5(b"content")
    )
    assert fetch(remote, tmp_path, progress=False).read_bytes() == b"content"
    dead = RemoteFile("g.mat", (_closed_port_url() + "/g.mat", f"{url}/missing.mat"))
    with pytest.raises(DownloadError, match=r"could not download g\.mat: .*refused.*HTTP Error 404"):
        fetch(dead, tmp_path, progress=False, timeout=5)


def _tar_with(path: Path, members: dict[str, bytes], link: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            tar.addfile(info)
    return path


def test_extraction_refuses_members_escaping_the_target(tmp_path):
    target = tmp_path / "target"
    for name in ("../evil.txt", "/etc/evil.txt", "a/../../evil.txt"):
        with pytest.raises(UnsafeArchiveError, match="refusing to extract"):
            extract_archive(_tar_with(tmp_path / "bad.tgz", {"ok.txt": b"1", name: b"x"}), target)
    with pytest.raises(UnsafeArchiveError, match="is a link"):
        extract_archive(_tar_with(tmp_path / "link.tgz", {}, link=("data/passwd", "/etc/passwd")), target)
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(UnsafeArchiveError, match="outside the target"):
        extract_archive(tmp_path / "bad.zip", target)
    assert not (tmp_path / "evil.txt").exists()


def test_extraction_strips_the_top_folder_and_skips_macos_junk(tmp_path):
    members = {"Top/a.txt": b"a", "Top/sub/b.txt": b"b", "Top/._a.txt": b"junk", "__MACOSX/Top/._b.txt": b"junk"}
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    assert extract_archive(tmp_path / "x.zip", tmp_path / "out", strip_prefix="Top/") == 2
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "a.txt",
        "sub",
        "sub/b.txt",
    ]


def test_prepare_dataset_downloads_verifies_and_unpacks(http_root, tmp_path):
    served, url = http_root
    expected = make_cub(tmp_path / "src" / "CUB_200_2011", images_per_class=2)
    archive = served / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "CUB_200_2011", arcname="CUB_200_2011")
        tar.add(tmp_path / "src" / "CUB_200_2011" / "classes.txt", arcname="attributes.txt")
    remote = RemoteFile("CUB_200_2011.tgz", (f"{url}/CUB_200_2011.tgz",), _md5(archive.read_bytes()), "CUB_200_2011/")
    dist = Distribution("CUB (test)", "https://example.org", ((remote,),), "ROOT/images.txt")
    source = CUBSource(tmp_path / "data" / "CUB_200_2011")
    summary = prepare_dataset(source, dist, progress=False)
    assert summary["status"] == "downloaded"
    assert {k: summary[k] for k in expected.as_dict()} == expected.as_dict()
    assert (tmp_path / "data" / "downloads" / "CUB_200_2011.tgz").is_file()
    assert not (tmp_path / "data" / ".CUB_200_2011.partial").exists()
    assert prepare_dataset(source, dist, progress=False)["status"] == "already prepared"


def test_prepare_data_without_network_says_where_to_get_it(tmp_path, capsys):
    root = tmp_path / "CUB_200_2011"
    assert prepare_data(["data=cub", f"data.root={root}", "--mirror", _closed_port_url(), "--timeout", "5"]) == 1
    captured = capsys.readouterr()
    assert "could not download CUB_200_2011.tgz" in captured.err
    assert "data.caltech.edu" in captured.out and "97eceeb196236b17998738112f37df78" in captured.out
    assert f"{root}/images.txt" in captured.out and "train 5,864 images / 100 classes" in captured.out
    assert prepare_data(["data=cars196", "--info"]) == 0
    out = capsys.readouterr().out
    assert "car_ims.tgz" in out and "cars_test_annos_withlabels.mat" in out and "Kaggle" in out
    assert prepare_data(["data=folder"]) == 0
    assert "nothing to download" in capsys.readouterr().out


# --- configs and training ---


@pytest.mark.parametrize(
    ("option", "recall_at_k", "root_name"),
    [
        ("cub", [1, 2, 4, 8], "CUB_200_2011"),
        ("cars196", [1, 2, 4, 8], "cars196"),
        ("sop", [1, 10, 100, 1000], "Stanford_Online_Products"),
        ("folder", [1, 2, 4, 8], "images"),
    ],
)
def test_data_configs_follow_the_recipe(option, recall_at_k, root_name, tmp_path):
    cfg = compose_config([f"data={option}"], tmp_path, tmp_path, tiny=False)
    assert cfg.data._target_ == "metricsearch.data.datamodule.MetricDataModule"
    assert (cfg.data.image_size, cfg.data.resize_size, cfg.data.hflip) == (224, 256, True)
    assert list(cfg.data.recall_at_k) == recall_at_k
    assert Path(cfg.data.source.root) == tmp_path / root_name


def test_sop_datamodule_batches_with_two_images_per_class(sop_copy, tmp_path):
    overrides = [
        "data=sop",
        f"data.root={sop_copy[0]}",
        "sampler.m=2",
        "data.batch_size=8",
        "data.image_size=16",
        "data.resize_size=16",
        "data.num_workers=0",
        "data.val_fraction=0.2",
    ]
    cfg = compose_config(overrides, tmp_path, tmp_path, tiny=False)
    datamodule = instantiate(cfg.data, sampler=instantiate(cfg.sampler))
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16)
    assert np.all(np.bincount(batch["label"].numpy()) % 2 == 0)
    assert datamodule.recall_at_k == [1, 10, 100, 1000]


def _train(option: str, root: Path, run_dir: Path) -> dict:
    command = [
        sys.executable,
        "train.py",
        f"data={option}",
        f"data.root={root}",
        "backbone=resnet10t",
        "head.embedding_dim=16",
        "data.image_size=32",
        "data.resize_size=36",
        "data.batch_size=8",
        "data.eval_batch_size=64",
        "data.num_workers=0",
        "sampler.m=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "test_untrained=false",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={run_dir.parent}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def test_train_on_a_miniature_cub(cub_copy, tmp_path):
    metrics = _train("cub", cub_copy[0], tmp_path / "run")
    assert 0.0 <= metrics["metrics"]["test"]["recall@1"] <= 1.0
    assert "recall@8" in metrics["metrics"]["test"]


@pytest.mark.slow
@pytest.mark.parametrize("option", ["cars196", "sop", "folder"])
def test_train_on_each_other_miniature_copy(option, request, tmp_path):
    if option == "folder":
        # The shared copy has 4 training classes, too few for 20% validation classes and 4 classes per batch.
        root = tmp_path / "images"
        make_folder(root, num_classes=16)
    else:
        root, _ = request.getfixturevalue(FORMATS[option])
    metrics = _train(option, root, tmp_path / "run")
    key = "recall@1000" if option == "sop" else "recall@8"
    assert 0.0 <= metrics["metrics"]["test"]["recall@1"] <= 1.0 and key in metrics["metrics"]["test"]
