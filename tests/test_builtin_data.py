"""The built-in offline datasets and the file helpers under them: image loading and atomic writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from metricsearch.data.dataset import LABEL
from metricsearch.data.digits import DigitsSource
from metricsearch.data.io import ImageLoadError, load_rgb_image
from metricsearch.data.records import DatasetError
from metricsearch.data.synthetic import (
    PATTERNS,
    SHAPE_REACH,
    SHAPES,
    SyntheticSource,
    attribute_counts,
    class_attributes,
)
from metricsearch.utils.atomic_io import atomic_path, atomic_write_bytes, atomic_write_text
from tests.helpers import compose_config

TINY = {"num_classes": 12, "images_per_class": 6, "image_size": 32}


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSource:
    source = SyntheticSource(tmp_path_factory.mktemp("synthetic"), **TINY)
    source.load()
    return source


# --- synthetic data ---


def test_synthetic_counts_and_split_by_class_id(tiny_source: SyntheticSource) -> None:
    split = tiny_source.load()
    assert len(split.train) == len(split.test) == 6 * 6
    assert split.train.classes.tolist() == list(range(6))
    assert split.test.classes.tolist() == list(range(6, 12))
    assert np.bincount(split.train.labels).tolist() == [6] * 6
    assert not set(split.train.classes) & set(split.test.classes)
    assert all(p.is_absolute() and p.is_file() for p in split.train.paths + split.test.paths)
    assert len(set(split.train.paths + split.test.paths)) == 72
    assert sorted(split.test.class_names) == list(range(6, 12))
    assert all(re.fullmatch(r"c\d{3}-[a-z]+-[a-z]+-[a-z]+", n) for n in split.train.class_names.values())


def test_synthetic_train_classes_moves_the_split_without_new_files(tiny_source: SyntheticSource) -> None:
    manifest_mtime = (tiny_source.folder / "manifest.json").stat().st_mtime_ns
    split = SyntheticSource(tiny_source.root, train_classes=8, **TINY).load()
    assert split.train.classes.tolist() == list(range(8))
    assert split.test.classes.tolist() == list(range(8, 12))
    assert (tiny_source.folder / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_synthetic_every_file_decodes_to_rgb_of_the_right_size(tiny_source: SyntheticSource) -> None:
    split = tiny_source.load()
    for path in split.train.paths + split.test.paths:
        image = load_rgb_image(path)
        assert (image.mode, image.size) == ("RGB", (32, 32))


def test_synthetic_is_deterministic_from_the_seed(tiny_source: SyntheticSource, tmp_path: Path) -> None:
    again = SyntheticSource(tmp_path / "again", **TINY)
    again.load()
    assert _file_bytes(again.folder) == _file_bytes(tiny_source.folder)

    other = SyntheticSource(tmp_path / "other", **{**TINY, "seed": 1})
    other.load()
    other_bytes, reference = _file_bytes(other.folder), _file_bytes(tiny_source.folder)
    assert other_bytes.keys() == reference.keys()
    assert all(other_bytes[name] != reference[name] for name in reference)


def test_synthetic_reuses_a_finished_cache(tiny_source: SyntheticSource) -> None:
    files = sorted(tiny_source.folder.rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    tiny_source.load()
    assert sorted(tiny_source.folder.rglob("*")) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_synthetic_regenerates_an_interrupted_build(tmp_path: Path) -> None:
    source = SyntheticSource(tmp_path, **TINY)
    source.load()
    before = _file_bytes(source.folder)
    # What an interrupted build leaves: no manifest, some files missing, maybe stray ones.
    (source.folder / "manifest.json").unlink()
    source.image_path(3, 2).unlink()
    stray = source.folder / "images" / "000" / "999.jpg"
    stray.write_bytes(b"half an image")

    source.load()
    assert (source.folder / "manifest.json").is_file()
    assert not stray.exists()
    assert _file_bytes(source.folder) == before


def test_synthetic_names_the_fix_when_cached_files_vanish(tmp_path: Path) -> None:
    source = SyntheticSource(tmp_path, **TINY)
    source.load()
    source.image_path(5, 1).unlink()
    with pytest.raises(DatasetError, match="delete that folder"):
        source.load()


def test_attribute_vocabulary_scales_with_the_number_of_classes() -> None:
    assert attribute_counts(200) == (8, 5, 5)
    for num_classes in (4, 5, 12, 37, 200, 500):
        counts = attribute_counts(num_classes)
        attributes = class_attributes(num_classes, seed=0)
        assert np.prod(counts) >= num_classes
        assert len(set(attributes)) == num_classes  # every class is a distinct combination
        train = attributes[: num_classes // 2]
        for a in range(3):  # the training half sees every attribute value in use
            assert {c[a] for c in train} == {c[a] for c in attributes}
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSource("unused", num_classes=3)


def test_default_synthetic_data_defeats_raw_pixel_retrieval(tmp_path: Path) -> None:
    """The default data is hard for a trivial embedding: raw-pixel kNN stays far below what training reaches.

    The nuisance (position, scale, tilt, clutter, colour jitter) must hide the class from pixel-wise
    similarity, or a learnt embedding's gain would not show. Chance is ~1% R@1 on the 100 test classes;
    a trained resnet10t reaches ~35% in the default run.
    """
    split = SyntheticSource(tmp_path).load()  # the default configuration: 200 classes x 20 images, 64 px
    test = split.test
    assert len(np.unique(test.labels)) == 100 and len(test) == 2000
    pixels = np.stack([np.asarray(load_rgb_image(p), dtype=np.float64).ravel() for p in test.paths])
    pixels -= pixels.mean(axis=1, keepdims=True)  # per-image brightness removed: the stronger pixel baseline
    pixels /= np.linalg.norm(pixels, axis=1, keepdims=True)
    # Plain reference: brute-force cosine kNN, the query excluded by index.
    scores = pixels @ pixels.T
    np.fill_diagonal(scores, -np.inf)
    nearest = scores.argmax(axis=1)
    recall_at_1 = float(np.mean(test.labels[nearest] == test.labels))
    assert 0.02 < recall_at_1 < 0.2, recall_at_1  # above chance (classes are drawable) but low


def test_shapes_and_patterns_are_mirror_symmetric() -> None:
    """A horizontal flip must keep the class: every shape, and every pattern up to its random phase."""
    axis = ((np.arange(96) + 0.5) / 96 * 2 - 1) * 1.2  # pixel centres, as drawn: symmetric, off the edges
    u, v = np.meshgrid(axis, axis)
    for name, shape in SHAPES.items():
        inside = shape(u, v)
        assert inside.mean() > 0.15, name
        assert np.array_equal(inside, shape(-u, v)), name
        assert np.hypot(u, v)[inside].max() <= SHAPE_REACH, name  # drawing windows rely on it
    phase_free = ("solid", "stripes", "rim", "rings", "halves", "chevrons")
    for name in phase_free:
        mask = PATTERNS[name](u, v, SHAPES["star"], np.random.default_rng(0))
        mirrored = PATTERNS[name](-u, v, SHAPES["star"], np.random.default_rng(0))
        assert np.array_equal(mask, mirrored), name


# --- digits ---


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory: pytest.TempPathFactory) -> DigitsSource:
    source = DigitsSource(tmp_path_factory.mktemp("digits"))
    source.load()
    return source


def test_digits_counts_and_split(digits_source: DigitsSource) -> None:
    split = digits_source.load()
    assert len(split.train) + len(split.test) == 1797
    assert split.train.classes.tolist() == [0, 1, 2, 3, 4]
    assert split.test.classes.tolist() == [5, 6, 7, 8, 9]
    assert np.bincount(split.test.labels)[5:].sum() == len(split.test)
    assert all(p.parent.name == str(label) for p, label in zip(split.test.paths, split.test.labels, strict=True))
    with Image.open(split.test.paths[0]) as raw:
        assert raw.mode == "L"  # stored grayscale, converted on load like a real dataset's odd files
    image = load_rgb_image(split.test.paths[0])
    assert (image.mode, image.size) == ("RGB", (32, 32))


def test_digits_custom_split_reuses_the_files(digits_source: DigitsSource) -> None:
    manifest_mtime = (digits_source.folder / "manifest.json").stat().st_mtime_ns
    split = DigitsSource(digits_source.root, train_digits=[9, 7]).load()
    assert split.train.classes.tolist() == [7, 9]
    assert split.test.classes.tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    assert (digits_source.folder / "manifest.json").stat().st_mtime_ns == manifest_mtime
    with pytest.raises(ValueError, match="train_digits"):
        DigitsSource(digits_source.root, train_digits=tuple(range(10)))


@pytest.mark.parametrize("overrides", [["data=digits"], ["experiment=digits_triplet"]], ids=" ".join)
def test_digits_configs_draw_their_training_batches(
    overrides: list[str], digits_source: DigitsSource, tmp_path: Path
) -> None:
    """`python train.py data=digits` (and the digits recipe) must fit its batches to the 3 training classes."""
    cfg = compose_config([*overrides, "data.num_workers=0"], tmp_path / "run", Path(digits_source.root), tiny=False)
    datamodule = instantiate(cfg.data, sampler=instantiate(cfg.sampler))
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.num_train_classes == 3  # digits 0-4, two of them held out for validation
    batches = iter(datamodule.train_dataloader())
    for _ in range(3):
        labels = next(batches)[LABEL]
        assert len(labels) == cfg.data.batch_size
        assert np.bincount(labels.numpy()).tolist() == [cfg.sampler.m] * 3


# --- load_rgb_image ---


def _photo(size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("L", ".jpg"), ("CMYK", ".jpg"), ("RGBA", ".png"), ("LA", ".png"), ("P", ".png"), ("1", ".png")],
)
def test_load_rgb_image_converts_every_mode(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"image-{mode}{suffix}"
    _photo().convert(mode).save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
    image = load_rgb_image(path)
    assert (image.mode, image.size) == ("RGB", (40, 30))


def test_load_rgb_image_composites_transparency_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:, :2] = (200, 0, 0, 255)  # opaque red left half, fully transparent black right half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(load_rgb_image(tmp_path / "alpha.png"))
    assert (pixels[:, :2] == (200, 0, 0)).all()
    assert (pixels[:, 2:] == 255).all()

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.paste(1, (0, 0, 2, 4))
    palette.save(tmp_path / "palette.png", transparency=0)
    pixels = np.asarray(load_rgb_image(tmp_path / "palette.png"))
    assert (pixels[:, :2] == (10, 20, 30)).all()
    assert (pixels[:, 2:] == 255).all()


def test_load_rgb_image_rescales_16_bit(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    pixels = np.asarray(load_rgb_image(tmp_path / "deep.png"))
    assert pixels[..., 0].tolist() == [[0, 100], [200, 255]]


def test_load_rgb_image_rejects_bad_files_naming_them(tmp_path: Path) -> None:
    jpeg = tmp_path / "whole.jpg"
    _photo((64, 64)).save(jpeg, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image\n")
    missing = tmp_path / "missing.jpg"
    for path in (truncated, not_image, missing):
        with pytest.raises(ImageLoadError, match=re.escape(str(path))) as error:
            load_rgb_image(path)
        assert "remove or replace the file" in str(error.value)
        assert isinstance(error.value, DatasetError)


def test_load_rgb_image_refuses_decompression_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    _photo((40, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 // 2 + 1)  # over the limit, under twice it: a warning
    with pytest.raises(ImageLoadError, match="big.png"):
        load_rgb_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # more than twice over: PIL's own error
    with pytest.raises(ImageLoadError, match="big.png"):
        load_rgb_image(path)


# --- atomic writes ---


def test_atomic_writers_replace_the_file(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_path_keeps_the_suffix_for_format_sniffing_writers(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "picture.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and not tmp.exists()
        _photo().save(tmp)  # PIL picks the format from the suffix
    with Image.open(tmp_path / "picture.png") as image:
        assert image.format == "PNG"


def test_atomic_path_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(target):
        pass
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
