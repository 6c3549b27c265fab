"""DeepFashion In-Shop: the partition file read into train / query / gallery, every malformed copy named in one line,
scripts/check_data.py's counts and scripts/prepare_data.py's directions (tests/inshop_fixtures.py writes the copies)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metricsearch.cli.data import main_check_data as check_data
from metricsearch.cli.data import main_prepare_data as prepare_data
from metricsearch.data.disk_source import SplitCounts
from metricsearch.data.inshop import InShopSource
from metricsearch.data.records import QUERY_GALLERY, DatasetError
from tests.dataset_fixtures import copy_tree
from tests.helpers import REPO_ROOT, compose_config
from tests.inshop_fixtures import InShopCopy, make_inshop


@pytest.fixture(scope="module")
def inshop(tmp_path_factory) -> InShopCopy:
    return make_inshop(tmp_path_factory.mktemp("inshop") / "Inshop_Clothes")


@pytest.fixture
def damaged(inshop, tmp_path) -> InShopCopy:
    """A private copy of the shared miniature, for tests that break it."""
    root = copy_tree(inshop.root, tmp_path / "Inshop_Clothes")
    return InShopCopy(root, inshop.counts, inshop.rows)


def _rewrite(copy: InShopCopy, edit) -> None:
    """Replace the partition file's lines with ``edit(lines)``."""
    lines = copy.partition.read_text().splitlines()
    copy.partition.write_text("\n".join(edit(lines)) + "\n")


def _error(copy: InShopCopy) -> str:
    with pytest.raises(DatasetError) as info:
        InShopSource(copy.root).load()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- reading the partition ---


def test_the_partition_gives_train_queries_and_gallery(inshop):
    split = InShopSource(inshop.root).load()
    assert split.protocol == QUERY_GALLERY
    assert SplitCounts.of(split) == inshop.counts == SplitCounts.query_gallery(30, 8, 12, 6, 4)
    # Items id_00000001, 3, ... train; 2, 4, ... are searched: the id's number is the label, the id its name.
    assert sorted(set(split.train.labels.tolist())) == [1, 3, 5, 7, 9, 11]
    assert split.train.class_names == {n: f"id_{n:08d}" for n in (1, 3, 5, 7, 9, 11)}
    assert sorted(set(split.test.labels.tolist())) == sorted(set(split.gallery.labels.tolist())) == [2, 4, 6, 8]
    for records, status in ((split.train, "train"), (split.test, "query"), (split.gallery, "gallery")):
        listed = [(inshop.root / name, int(item.removeprefix("id_"))) for name, item in inshop.rows[status]]
        assert list(zip(records.paths, records.labels.tolist(), strict=True)) == listed
    # Each test item: its first two images are queries, the other three the gallery.
    assert np.bincount(split.test.labels).tolist() == [0, 0, 2, 0, 2, 0, 2, 0, 2]
    assert all(path.name.startswith(("01_", "02_")) for path in split.test.paths)
    assert not set(split.test.paths) & set(split.gallery.paths)
    assert split.num_queries == 8 and split.evaluation.paths == [*split.test.paths, *split.gallery.paths]


def test_img_inside_Img_and_the_archive_folder_are_found(tmp_path):
    copy = make_inshop(tmp_path / "download" / "In-shop Clothes Retrieval Benchmark", inside_img=True)
    source = InShopSource(tmp_path / "download")
    split = source.load()
    assert source.layout == "Img/img" and source.dataset_dir == copy.root
    assert split.gallery.paths[0] == copy.root / "Img" / copy.rows["gallery"][0][0]
    assert SplitCounts.of(split) == copy.counts


def test_a_query_item_without_gallery_images_is_a_warning(tmp_path, caplog):
    copy = make_inshop(tmp_path / "inshop", images_per_item=3, queries_per_item=2)
    # Item id_00000002's only gallery image becomes a query: its queries have no correct answer and are left out.
    _rewrite(
        copy, lambda lines: [line.replace("gallery", "query") if "id_00000002" in line else line for line in lines]
    )
    with caplog.at_level(logging.WARNING):
        split = InShopSource(copy.root).load()
    assert 2 not in split.gallery.labels and "1 query items have no gallery image (e.g. id_00000002)" in caplog.text
    left_out = int((split.test.labels == 2).sum())
    assert f"their {left_out} queries have no correct answer and are left out of the metrics" in caplog.text
    assert "never be answered" not in caplog.text


# --- malformed copies, each named in one line ---


def test_missing_partition_file(damaged):
    damaged.partition.unlink()
    message = _error(damaged)
    assert "partition file" in message and "Eval/list_eval_partition.txt is missing" in message
    assert "expected layout" in message


def test_bad_count_line(damaged):
    _rewrite(damaged, lambda lines: ["fifty", *lines[1:]])
    assert "line 1 should be the number of images, got 'fifty'" in _error(damaged)
    _rewrite(damaged, lambda lines: ["999", *lines[1:]])
    assert "line 1 says 999 images but the file lists 50" in _error(damaged)


def test_bad_header(damaged):
    _rewrite(damaged, lambda lines: [lines[0], "image_name item evaluation_status", *lines[2:]])
    message = _error(damaged)
    assert "line 2 should be the header 'image_name item_id evaluation_status'" in message


def test_unknown_status_names_file_and_line(damaged):
    _rewrite(damaged, lambda lines: [*lines[:5], lines[5].replace("train", "val"), *lines[6:]])
    message = _error(damaged)
    assert f"{damaged.partition} line 6: evaluation_status 'val' is not one of train, query, gallery" in message


def test_malformed_rows(damaged):
    name, _, status = damaged.partition.read_text().splitlines()[3].split()
    _rewrite(damaged, lambda lines: [*lines[:3], f"{name} {status}", *lines[4:]])
    assert "line 4 should be 'image_name item_id evaluation_status'" in _error(damaged)
    _rewrite(damaged, lambda lines: [*lines[:3], f"{name} item_1 {status}", *lines[4:]])
    assert "line 4: item_id 'item_1' should look like 'id_00000002'" in _error(damaged)


def test_an_image_listed_twice(damaged):
    _rewrite(damaged, lambda lines: [str(int(lines[0]) + 1), *lines[1:], lines[-1]])
    assert "line 53: image img/" in _error(damaged)


def test_an_item_in_both_train_and_evaluation(damaged):
    # id_00000001's last image becomes a gallery image: a training item would be evaluated.
    _rewrite(damaged, lambda lines: [*lines[:6], lines[6].replace("train", "gallery"), *lines[7:]])
    message = _error(damaged)
    assert "1 items have both train and query/gallery images (e.g. id_00000001)" in message


def test_no_gallery(damaged):
    _rewrite(
        damaged,
        lambda lines: [line.removesuffix("gallery") + "query" if line.endswith("gallery") else line for line in lines],
    )
    assert "no gallery images (the gallery rows of Eval/list_eval_partition.txt)" in _error(damaged)


def test_missing_gallery_image(damaged):
    name = damaged.rows["gallery"][-1][0]
    (damaged.root / name).unlink()
    message = _error(damaged)
    assert "1 of 50 listed images are missing" in message and name in message


# --- scripts/check_data.py and scripts/prepare_data.py ---


def test_check_data_reports_queries_and_gallery(inshop, capsys):
    assert check_data(["data=inshop", f"data.root={inshop.root}", "--verify"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    summary = json.loads(out[0])
    counts = {"train_images": 30, "query_images": 8, "gallery_images": 12, "train_classes": 6, "test_classes": 4}
    assert {k: summary[k] for k in counts} == counts and "test_images" not in summary
    assert summary["protocol"] == "query_gallery" and summary["layout"] == "img"
    assert summary["expected"] == {
        "train_images": 25882,
        "query_images": 14218,
        "gallery_images": 12612,
        "train_classes": 3997,
        "test_classes": 3985,
    }
    assert summary["matches_expected"] is False and summary["images_verified"] is True


def test_check_data_verifies_the_gallery_and_is_strict(damaged, capsys):
    assert check_data(["data=inshop", f"data.root={damaged.root}", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "expected train 25,882 images / 3,997 classes, test 14,218 queries + 12,612 gallery images" in err
    name = damaged.rows["gallery"][-1][0]
    (damaged.root / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert check_data(["data=inshop", f"data.root={damaged.root}", "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and Path(name).name in err[0]


def test_check_data_script_runs(inshop):
    result = subprocess.run(
        [sys.executable, "scripts/check_data.py", "data=inshop", f"data.root={inshop.root}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["gallery_images"] == 12
    assert "is not the complete dataset" in result.stderr


def test_prepare_data_says_where_to_get_it(inshop, tmp_path, capsys):
    root = tmp_path / "Inshop_Clothes"
    assert prepare_data(["data=inshop", f"data.root={root}"]) == 1
    captured = capsys.readouterr()
    assert "cannot be downloaded automatically" in captured.err
    assert "cannot be downloaded automatically. Get it by hand" in captured.out
    assert "mmlab.ie.cuhk.edu.hk/projects/DeepFashion" in captured.out and "Google Drive" in captured.out
    assert f"{root}/Eval/list_eval_partition.txt" in captured.out and "Img/img.zip" in captured.out
    assert "train 25,882 images / 3,997 classes, test 14,218 queries + 12,612 gallery images" in captured.out
    assert f"python scripts/check_data.py data=inshop data.root={root}" in captured.out
    assert prepare_data(["data=inshop", "--info"]) == 0
    assert "Img/img.zip" in capsys.readouterr().out
    # A copy already in place is all prepare_data needs.
    assert prepare_data(["data=inshop", f"data.root={inshop.root}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "already prepared" and summary["query_images"] == 8


def test_the_data_config(tmp_path):
    cfg = compose_config(["data=inshop"], tmp_path, tmp_path, tiny=False)
    assert cfg.data.source._target_ == "metricsearch.data.inshop.InShopSource"
    assert list(cfg.data.recall_at_k) == [1, 10, 20, 30, 40, 50]
    assert (cfg.data.image_size, cfg.data.resize_size, cfg.data.hflip) == (224, 256, True)
    assert Path(cfg.data.source.root) == tmp_path / "Inshop_Clothes"


def test_zero_shot_counts_keep_their_keys():
    counts = SplitCounts(10, 12, 2, 3)
    assert counts.as_dict() == {"train_images": 10, "test_images": 12, "train_classes": 2, "test_classes": 3}
    assert counts.describe() == "train 10 images / 2 classes, test 12 images / 3 classes"
