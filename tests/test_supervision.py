"""Learning without class labels (``conf/supervision``): given pairs and triplets, and two views per image.

Every loss path is checked against a plain computation of its paper's formula on given embeddings; the tuples
files are checked for the faults a hand-made CSV has; the training batches are checked to carry no label; and the
commands a user types train, select, index and search.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory, NTXentLoss, TripletMarginLoss, VICRegLoss

from metricsearch.data.dataset import LABEL
from metricsearch.data.tuples import (
    SAME,
    TUPLES,
    TupleFileError,
    check_tuples_in,
    format_tuples_csv,
    read_tuples_file,
    sample_tuples,
)
from metricsearch.data.views import VIEWS, ViewTransform
from metricsearch.models.self_supervised import moco_loss, simclr_loss, vicreg_loss
from metricsearch.models.tuple_module import tuple_loss
from metricsearch.pipelines.train import build_run
from tests.helpers import compose_config, run_train


def _embeddings(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- losses against plain references ---------------------------------------------------------------------------


def test_pair_loss_is_the_contrastive_loss_of_exactly_the_given_pairs():
    embeddings = _embeddings(7)
    tuples = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 6], [1, 2], [3, 6]])
    same = torch.tensor([True, True, False, False, True, False])
    pos_margin, neg_margin = 0.1, 1.2
    loss = tuple_loss(ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin), embeddings, tuples, same)

    unit = F.normalize(embeddings, dim=1)
    positives, negatives = [], []
    for (a, b), similar in zip(tuples.tolist(), same.tolist(), strict=True):
        distance = math.dist(unit[a].tolist(), unit[b].tolist())
        if similar:
            positives.append(max(0.0, distance - pos_margin))
        else:
            negatives.append(max(0.0, neg_margin - distance))
    # Each part averaged over its pairs with a non-zero loss (pytorch-metric-learning's AvgNonZeroReducer).
    expected = sum(np.mean([v for v in part if v > 0]) for part in (positives, negatives) if any(v > 0 for v in part))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_triplet_loss_is_the_margin_loss_of_exactly_the_given_triplets():
    embeddings = _embeddings(6, seed=1)
    # Image 1 is image 0 barely moved: triplets (0, 1, n) are already satisfied (zero loss), the others are not.
    embeddings[1] = embeddings[0] * 1.01
    tuples = torch.tensor([[0, 1, 2], [3, 4, 5], [1, 0, 5], [2, 3, 4]])
    margin = 0.3
    loss = tuple_loss(TripletMarginLoss(margin=margin), embeddings, tuples, None)

    unit = F.normalize(embeddings, dim=1)
    values = [
        max(0.0, math.dist(unit[a].tolist(), unit[p].tolist()) - math.dist(unit[a].tolist(), unit[n].tolist()) + margin)
        for a, p, n in tuples.tolist()
    ]
    assert 0 < sum(v > 0 for v in values) < len(values), "the reference should exercise the non-zero average"
    assert loss.item() == pytest.approx(np.mean([v for v in values if v > 0]), rel=1e-9)


def _info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: list[torch.Tensor], temperature: float) -> float:
    """-log of the softmax of the positive's cosine similarity among the positive and the negatives'."""

    def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(u @ v / (u.norm() * v.norm()))

    logits = [cosine(anchor, positive) / temperature] + [cosine(anchor, n) / temperature for n in negatives]
    return -(logits[0] - math.log(sum(math.exp(v) for v in logits)))


def test_simclr_loss_is_nt_xent_over_both_views():
    first, second = _embeddings(5, seed=2), _embeddings(5, seed=3)
    temperature = 0.3
    loss = simclr_loss(NTXentLoss(temperature=temperature), first, second)

    views = torch.cat([first, second])
    n = len(first)
    terms = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        negatives = [views[k] for k in range(2 * n) if k not in (i, partner)]
        terms.append(_info_nce(views[i], views[partner], negatives, temperature))
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-9)


def test_vicreg_loss_is_the_papers_three_terms():
    first, second = _embeddings(8, d=4, seed=4), _embeddings(8, d=4, seed=5)
    lam, mu, nu, eps = 25.0, 25.0, 1.0, 1e-4
    loss = vicreg_loss(VICRegLoss(invariance_lambda=lam, variance_mu=mu, covariance_v=nu, eps=eps), first, second)

    n, d = first.shape
    x, y = first.numpy(), second.numpy()
    invariance = ((x - y) ** 2).sum() / (n * d)

    def variance(z: np.ndarray) -> float:
        return float(np.mean([max(0.0, 1 - math.sqrt(np.var(z[:, j], ddof=1) + eps)) for j in range(d)]))

    def covariance(z: np.ndarray) -> float:
        cov = np.cov(z, rowvar=False)
        return float(sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d)

    expected = lam * invariance + mu * (variance(x) / 2 + variance(y) / 2) + nu * (covariance(x) + covariance(y))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_moco_loss_contrasts_each_query_with_its_key_against_the_batch_keys_and_the_queue():
    temperature = 0.2
    queue = CrossBatchMemory(NTXentLoss(temperature=temperature), embedding_size=6, memory_size=16)
    old_queries, old_keys = _embeddings(4, seed=6), _embeddings(4, seed=7)
    moco_loss(queue, old_queries.float(), old_keys.float(), first_label=0)
    queries, keys = _embeddings(4, seed=8).float(), _embeddings(4, seed=9).float()
    loss = moco_loss(queue, queries, keys, first_label=4)

    terms = []
    for i in range(4):
        negatives = [keys[j] for j in range(4) if j != i] + list(old_keys.float())
        terms.append(_info_nce(queries[i].double(), keys[i].double(), [n.double() for n in negatives], temperature))
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)
    # The keys are queued after the earlier ones; queries never are.
    torch.testing.assert_close(queue.embedding_memory[:8], torch.cat([old_keys.float(), keys]))
    assert not queue.embedding_memory[8:].any()


# --- tuples files: what a hand-made CSV gets wrong ----------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path) -> Path:
    """A data root with six small images in two folders, and one image outside it."""
    root = tmp_path / "root"
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 90, 20)).save(root / folder / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    return root


def _write(tmp_path: Path, text: str, name: str = "tuples.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_pairs_file_is_read_as_given(tmp_path, image_root):
    file = _write(tmp_path, "image1,image2,label\na/0.png,a/1.png,same\n\na/0.png,b/2.png,different\n")
    tuples = read_tuples_file(file, "pairs", image_root)
    assert [p.relative_to(image_root).as_posix() for p in tuples.paths] == ["a/0.png", "a/1.png", "b/2.png"]
    assert tuples.tuples.tolist() == [[0, 1], [0, 2]]
    assert tuples.same.tolist() == [True, False]
    assert tuples.lines.tolist() == [2, 4]


@pytest.mark.parametrize(
    ("kind", "text", "line", "problem"),
    [
        ("pairs", "", None, "empty"),
        ("pairs", "image1,image2,label\n", None, "no pairs"),
        ("pairs", "a,b,c\na/0.png,a/1.png,same\n", "line 1", "header"),
        ("pairs", "image1,image2,label\na/0.png,a/1.png,same\na/0.png,a/9.png,same\n", "line 3", "does not exist"),
        ("pairs", "image1,image2,label\na/0.png,../outside.png,different\n", "line 2", "leaves the data root"),
        ("pairs", "image1,image2,label\na/0.png,/etc/passwd,different\n", "line 2", "absolute path"),
        ("pairs", "image1,image2,label\na/0.png,a/1.png\n", "line 2", "2 fields, expected 3"),
        ("pairs", "image1,image2,label\na/0.png,a/1.png,similar\n", "line 2", "is not `same` or `different`"),
        ("pairs", "image1,image2,label\na/0.png,,same\n", "line 2", "empty field"),
        ("pairs", "image1,image2,label\na/0.png,a/./0.png,same\n", "line 2", "same image twice"),
        ("triplets", "anchor,positive,negative\na/0.png,a/1.png,b/0.png,b/1.png\n", "line 2", "4 fields, expected 3"),
        ("triplets", "anchor,positive,negative\na/0.png,a/1.png,b/7.png\n", "line 2", "does not exist"),
    ],
)
def test_a_broken_tuples_file_is_refused_naming_the_file_the_line_and_the_fix(
    tmp_path, image_root, kind, text, line, problem
):
    file = _write(tmp_path, text)
    with pytest.raises(TupleFileError) as caught:
        read_tuples_file(file, kind, image_root)
    message = str(caught.value)
    assert f"data.{kind}_file={file}" in message and problem in message
    if line is not None:
        assert f" {line}:" in message
    assert "\n" not in message
    assert any(word in message for word in ("fix", "use", "give", "name", "make", "add", "every line", "needs"))


def test_a_missing_tuples_file_is_refused(tmp_path, image_root):
    with pytest.raises(TupleFileError, match="no such file"):
        read_tuples_file(tmp_path / "nope.csv", "pairs", image_root)


def test_a_link_out_of_the_root_is_refused(tmp_path, image_root):
    (image_root / "a" / "link.png").symlink_to(tmp_path / "outside.png")
    file = _write(tmp_path, "image1,image2,label\na/0.png,a/link.png,same\n")
    with pytest.raises(TupleFileError, match="line 2: `a/link.png` leaves the data root"):
        read_tuples_file(file, "pairs", image_root)


def test_a_tuple_naming_a_non_training_image_is_refused(tmp_path, image_root):
    file = _write(tmp_path, "anchor,positive,negative\na/0.png,a/1.png,b/0.png\na/0.png,a/2.png,b/1.png\n")
    tuples = read_tuples_file(file, "triplets", image_root)
    training = sorted((image_root / "a").glob("*.png")) + [image_root / "b" / "0.png"]
    with pytest.raises(TupleFileError, match=r"line 3: image .*b/1.png is not a training image"):
        check_tuples_in(tuples, training)
    check_tuples_in(tuples, training + [image_root / "b" / "1.png"])


def test_train_py_refuses_a_broken_pairs_file_in_one_line_before_any_work(tmp_path, data_dir):
    file = _write(tmp_path, "image1,image2,label\nimages/000/000.jpg,images/000/001.jpg,maybe\n")
    fresh_data = tmp_path / "fresh-data"
    result = run_train(["supervision=pairs", f"data.pairs_file={file}"], tmp_path / "run", fresh_data)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"data.pairs_file={file} line 2" in errors[0]
    # Checked before the built-in data was generated or a model built.
    assert not any(fresh_data.glob("synthetic-*/images"))


# --- what training reads ------------------------------------------------------------------------------------------


def _tiny_pairs_file(
    tmp_path: Path, data_dir: Path, kind: str = "pairs", count: int = 24, holdout: float = 0.2
) -> Path:
    from metricsearch.pipelines.data_tools import make_tuples

    out = tmp_path / f"{kind}.csv"
    overrides = [
        f"paths.data_dir={data_dir}",
        "data.source.num_classes=12",
        "data.source.images_per_class=8",
        "data.source.image_size=32",
    ]
    make_tuples(overrides, kind, count, str(out), seed=0, holdout=holdout)
    return out


@pytest.mark.parametrize("supervision", ["pairs", "triplets", "none"])
def test_training_batches_carry_no_class_label(tmp_path, data_dir, supervision):
    overrides = [f"supervision={supervision}"]
    tuples_file = None
    if supervision != "none":
        tuples_file = _tiny_pairs_file(tmp_path, data_dir, supervision)
        overrides.append(f"data.{supervision}_file={tuples_file}")
    module, datamodule = build_run(compose_config(overrides, tmp_path / "run", data_dir))
    loader = datamodule.train_dataloader()
    assert not hasattr(loader.dataset, "labels"), "the training dataset holds class labels"
    batches = list(loader)
    assert batches
    for batch in batches:
        assert LABEL not in batch
        if supervision == "none":
            assert set(batch) == {VIEWS, "index"}
            views = batch[VIEWS]
            assert views.shape[0] == 2 and not torch.equal(views[0], views[1])
        else:
            assert set(batch) == {"image", "index", TUPLES} | ({SAME} if supervision == "pairs" else set())
    if supervision != "none":
        # The batches hold exactly the file's tuples: mapped back to image paths, one epoch is a subset of its lines.
        tuples = read_tuples_file(tuples_file, supervision, datamodule.source.folder)
        given = {tuple(row) for row in tuples.tuples.tolist()}
        for batch in batches:
            for row in batch[TUPLES].tolist():
                assert tuple(batch["index"][row].tolist()) in given
        assert batch["image"].shape[0] == len(batch["index"]) <= 16


def test_views_follow_the_seed_and_the_settings():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    transform = ViewTransform(32, mean=(0, 0, 0), std=(1, 1, 1))
    one = transform(image, np.random.default_rng(5))
    assert torch.equal(one, transform(image, np.random.default_rng(5)))
    assert not torch.equal(one, transform(image, np.random.default_rng(6)))
    gray = ViewTransform(32, grayscale_p=1.0, mean=(0, 0, 0), std=(1, 1, 1))(image, np.random.default_rng(5))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    plain = ViewTransform(
        32, scale=(1, 1), hflip=False, color_jitter_p=0, grayscale_p=0, blur_p=0, mean=(0, 0, 0), std=(1, 1, 1)
    )
    expected = torch.from_numpy(np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255).permute(
        2, 0, 1
    )
    assert (plain(image, np.random.default_rng(1)) - expected).abs().max() < 0.05
    with pytest.raises(ValueError, match="grayscale_p=1.5 is not a probability"):
        ViewTransform(32, grayscale_p=1.5)


def test_make_tuples_is_seeded_counted_and_leaves_validation_classes_unnamed(tmp_path, data_dir):
    from metricsearch.data.synthetic import SyntheticSource

    source = SyntheticSource(data_dir, num_classes=12, images_per_class=8, image_size=32)
    records = source.load().train
    first = _tiny_pairs_file(tmp_path / "a", data_dir, "pairs", count=30)
    again = _tiny_pairs_file(tmp_path / "b", data_dir, "pairs", count=30)
    assert first.read_text() == again.read_text()
    tuples = read_tuples_file(first, "pairs", source.folder)
    assert len(tuples) == 30 and tuples.same.sum() == 15
    assert len({tuple(sorted(row)) for row in tuples.tuples.tolist()}) == 30
    label_of = {path.resolve(): label for path, label in zip(records.paths, records.labels, strict=True)}
    labels = np.array([label_of[path] for path in tuples.paths])
    pair_labels = labels[tuples.tuples]
    assert np.array_equal(pair_labels[:, 0] == pair_labels[:, 1], tuples.same)
    # 20% of the 6 training classes (at least two) are named by no pair.
    assert len(set(labels.tolist())) == 4
    triplets = read_tuples_file(
        _tiny_pairs_file(tmp_path / "c", data_dir, "triplets", count=20), "triplets", source.folder
    )
    triplet_labels = np.array([label_of[path] for path in triplets.paths])[triplets.tuples]
    assert (triplet_labels[:, 0] == triplet_labels[:, 1]).all() and (triplet_labels[:, 0] != triplet_labels[:, 2]).all()
    rows = sample_tuples(records, "pairs", 10, seed=1, root=source.folder)
    assert format_tuples_csv("pairs", rows) != format_tuples_csv(
        "pairs", sample_tuples(records, "pairs", 10, 2, source.folder)
    )


# --- the closed set (test images of the training classes): tuples of training images, validation on the rest --------

CLOSED_SET_TINY = ["data=synthetic_cifar", "data.source.num_classes=10", "data.source.images_per_class=18"]


def _closed_set_tuples(tmp_path: Path, data_dir: Path, kind: str = "pairs", count: int = 40) -> Path:
    from metricsearch.pipelines.data_tools import make_tuples

    out = tmp_path / f"closed_{kind}.csv"
    make_tuples([f"paths.data_dir={data_dir}", *CLOSED_SET_TINY], kind, count, str(out), seed=0, holdout=0.2)
    return out


def test_closed_set_tuples_name_training_images_of_every_class_and_leave_some_of_each_unnamed(tmp_path, data_dir):
    from metricsearch.pipelines.data_tools import compose_data_source

    file = _closed_set_tuples(tmp_path, data_dir, "triplets", count=60)
    source = compose_data_source([f"paths.data_dir={data_dir}", *CLOSED_SET_TINY])
    split = source.load()
    tuples = read_tuples_file(file, "triplets", source.folder)
    label_of = {path.resolve(): label for path, label in zip(split.train.paths, split.train.labels, strict=True)}
    # Training images only (no test image), of the 10 classes the test images are of.
    assert all(path in label_of for path in tuples.paths)
    named = np.array([label_of[path] for path in tuples.paths])
    assert set(named.tolist()) == set(split.test.classes.tolist()) == set(range(10))
    # 20% of each class's 15 training images (3) are held out: no class has more than 12 of its images named.
    assert np.bincount(named, minlength=10).max() <= 12


def test_closed_set_tuples_validate_on_the_training_images_the_file_does_not_name(tmp_path, data_dir):
    file = _closed_set_tuples(tmp_path, data_dir, "pairs")
    cfg = compose_config([*CLOSED_SET_TINY, "supervision=pairs", f"data.pairs_file={file}"], tmp_path / "run", data_dir)
    _, datamodule = build_run(cfg)
    named = {path for path in datamodule.tuples.paths}
    train = {Path(p).resolve() for p in datamodule.train_records.paths}
    val = {Path(p).resolve() for p in datamodule.val_records.paths}
    test = {Path(p).resolve() for p in datamodule.split.evaluation.paths}
    all_training = {Path(p).resolve() for p in datamodule.split.train.paths}
    assert train == named and val == all_training - named
    assert not val & test and len(set(datamodule.val_records.labels.tolist())) == 10


def test_a_closed_set_tuple_naming_a_test_image_is_refused(tmp_path, data_dir):
    file = _closed_set_tuples(tmp_path, data_dir, "pairs")
    from metricsearch.pipelines.data_tools import compose_data_source

    source = compose_data_source([f"paths.data_dir={data_dir}", *CLOSED_SET_TINY])
    test_image = source.load().test.paths[0].relative_to(source.folder).as_posix()
    lines = file.read_text().splitlines()
    first = lines[1].split(",")
    lines.append(f"{first[0]},{test_image},different")
    file.write_text("\n".join(lines) + "\n")
    cfg = compose_config([*CLOSED_SET_TINY, "supervision=pairs", f"data.pairs_file={file}"], tmp_path / "run", data_dir)
    with pytest.raises(TupleFileError, match=rf"line {len(lines)}: image .* is not a training image"):
        build_run(cfg)


# --- what metrics.json says selected the model ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "supervision", "closed_set", "reason", "expected"),
    [
        ("val", "class", False, None, "the checkpoint with the best val/recall@1 on validation classes held out of "
         "training"),
        ("val", "class", True, None, "the checkpoint with the best val/recall@1 on validation images held out of "
         "every training class"),
        ("val", "pairs", False, None, "the checkpoint with the best val/recall@1 on the labelled training classes of "
         "which data.pairs_file names no image (their labels read only to evaluate), trained on the pairs of "
         "data.pairs_file only (no class label)"),
        ("val", "triplets", True, None, "the checkpoint with the best val/recall@1 on the labelled training images "
         "data.triplets_file does not name (their labels read only to evaluate), trained on the triplets of "
         "data.triplets_file only (no class label)"),
        ("val", "none", False, None, "the checkpoint with the best val/recall@1 on labelled validation classes held "
         "out of training (their labels read only to evaluate), trained on all training images without their "
         "labels"),
        ("val", "none", True, None, "the checkpoint with the best val/recall@1 on labelled validation images held out "
         "of every training class (their labels read only to evaluate), trained on all training images without "
         "their labels"),
        ("last", "class", False, None, "the last epoch's model, trained on all training classes (no model selection)"),
        ("last", "pairs", False, "no held-out class", "the last epoch's model, trained on the pairs of "
         "data.pairs_file only (no class label) (no model selection: no held-out class)"),
        ("last", "none", True, None, "the last epoch's model, trained on all training images without their labels "
         "(no model selection)"),
        ("test_best", "triplets", False, None, "the best of the per-epoch evaluations on the test classes "
         "(val/recall@1), trained on the triplets of data.triplets_file only (no class label): the papers' protocol, "
         "OPTIMISTIC because the test set chose the model"),
    ],
)  # fmt: skip
def test_the_selection_says_what_selected_and_what_was_trained_on(mode, supervision, closed_set, reason, expected):
    from metricsearch.pipelines.selection import selection_record

    record = selection_record(mode, "val/recall@1", supervision, closed_set, reason)
    assert record["description"] == expected
    assert record["optimistic"] is (mode == "test_best")
    assert record.get("fallback_reason") == reason
    assert "all training classes" not in expected or supervision == "class"


def test_a_tuples_run_with_nothing_to_select_on_says_so_once_and_records_why(tmp_path, data_dir, caplog):
    import logging

    from metricsearch.pipelines.train import train

    triplets = _tiny_pairs_file(tmp_path, data_dir, "triplets", count=12, holdout=0)
    cfg = compose_config(
        ["supervision=triplets", f"data.triplets_file={triplets}", "test_untrained=false", "module.compute_nmi=false"],
        tmp_path / "run",
        data_dir,
    )
    with caplog.at_level(logging.INFO, logger="metricsearch"):
        train(cfg)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    selection = summary["selection"]
    assert selection["mode"] == "last"
    assert selection["description"].startswith(
        "the last epoch's model, trained on the triplets of data.triplets_file only (no class label) (no model "
        "selection: supervision=triplets and no labelled training classes are held out of training"
    )
    assert "data.triplets_file names an image of every training class" in selection["fallback_reason"]
    messages = [r.getMessage() for r in caplog.records if "selection" in r.getMessage()]
    # One line, after the data showed there was nothing to select on; no claim that a setting changed the data.
    assert len(messages) == 1 and messages[0].startswith("selection=last: supervision=triplets"), messages
    assert "val_fraction: 0.0" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_closed_set_pairs_run_selects_on_the_images_its_file_does_not_name(tmp_path, data_dir):
    from metricsearch.pipelines.train import train

    pairs = _closed_set_tuples(tmp_path, data_dir, "pairs")
    overrides = [*CLOSED_SET_TINY, "supervision=pairs", f"data.pairs_file={pairs}", "test_untrained=false"]
    train(compose_config([*overrides, "module.compute_nmi=false"], tmp_path / "run", data_dir))
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["selection"]["mode"] == "val" and "recall@1" in summary["metrics"]["val_best"]
    assert "on the labelled training images data.pairs_file does not name" in summary["selection"]["description"]


# --- the commands a user types -----------------------------------------------------------------------------------


def _search_with(checkpoint: Path, gallery: Path, index_dir: Path) -> None:
    """Indexes ``gallery`` with the checkpoint and searches it with one of its images (the existing search code)."""
    from metricsearch.inference.model_loading import load_embedder
    from metricsearch.inference.predict_embeddings import make_predict_trainer
    from metricsearch.pipelines.index import build_index, search_files
    from metricsearch.search.index import open_index

    embedder = load_embedder(ckpt=checkpoint)
    build_index(embedder, gallery, index_dir, trainer=make_predict_trainer(progress_bar=False))
    index, recorded = open_index(index_dir)
    query = sorted(gallery.rglob("*.jpg"))[5]
    hits = search_files(index, recorded, [query], k=3)[0]
    assert len(hits) == 3 and Path(hits[0].path).name == query.name and hits[0].score == pytest.approx(1.0, abs=1e-4)
    # What is searched is the head's 16-d embedding, not a training-only projection (128-d).
    assert np.asarray(recorded.embed_images([Image.open(query).convert("RGB")])).shape == (1, 16)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_train_py_supervision_none_trains_selects_and_searches(tmp_path, data_dir, method):
    run_dir = tmp_path / "run"
    result = run_train(
        ["supervision=none", f"supervision.method={method}", "supervision.queue_size=64"], run_dir, data_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["supervision"] == {"mode": "none", "class_labels_read_in_training": False, "unlabelled_images": 32}
    assert summary["selection"]["mode"] == "val" and "recall@1" in summary["metrics"]["val_best"]
    assert summary["selection"]["description"].endswith(
        "on labelled validation classes held out of training (their labels read only to evaluate), trained on all "
        "training images without their labels"
    )
    assert "recall@1" in summary["metrics"]["test"]
    gallery = next(data_dir.glob("synthetic-v*-c12-n8-s32-seed0")) / "images"
    _search_with(Path(summary["best_checkpoint"]), gallery, tmp_path / "index")


@pytest.mark.slow
def test_train_py_supervision_pairs_trains_on_the_file_and_searches(tmp_path, data_dir):
    pairs = _tiny_pairs_file(tmp_path, data_dir, "pairs", count=24)
    run_dir = tmp_path / "run"
    result = run_train(["supervision=pairs", f"data.pairs_file={pairs}"], run_dir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["supervision"]["tuples"] == 24 and summary["supervision"]["class_labels_read_in_training"] is False
    # The classes no pair names are the validation classes that select the checkpoint.
    assert summary["selection"]["mode"] == "val"
    description = summary["selection"]["description"]
    assert "the labelled training classes of which data.pairs_file names no image" in description
    gallery = next(data_dir.glob("synthetic-v*-c12-n8-s32-seed0")) / "images"
    _search_with(Path(summary["best_checkpoint"]), gallery, tmp_path / "index")


@pytest.mark.slow
def test_without_held_out_labelled_classes_selection_falls_back_to_last(tmp_path, data_dir):
    triplets = _tiny_pairs_file(tmp_path, data_dir, "triplets", count=12, holdout=0)
    run_dir = tmp_path / "run"
    result = run_train(["supervision=triplets", f"data.triplets_file={triplets}"], run_dir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["selection"]["mode"] == "last"
    assert "selection: last" in (run_dir / "config.yaml").read_text()
    assert "no labelled training classes are held out" in result.stderr + result.stdout
    assert "val_fraction set to 0" not in result.stderr + result.stdout
    assert "trained on the triplets of data.triplets_file only" in summary["selection"]["description"]


def test_a_tuples_file_smaller_than_one_batch_is_refused(tmp_path, data_dir):
    from metricsearch.data.records import DatasetError

    pairs = _tiny_pairs_file(tmp_path, data_dir, "pairs", count=4)
    cfg = compose_config(["supervision=pairs", f"data.pairs_file={pairs}"], tmp_path / "run", data_dir)
    with pytest.raises(DatasetError, match=r"holds 4 pairs, fewer than one batch of 8 \(data.batch_size=16 // 2\)"):
        build_run(cfg)


def test_self_supervision_refuses_a_loss_an_experiment_sets_and_says_how_to_drop_it(tmp_path):
    from metricsearch.pipelines.train import _build_loss
    from metricsearch.utils.config import ConfigError

    cfg = compose_config(["experiment=seed_cifar10", "supervision=none"], tmp_path, tmp_path, tiny=False)
    with pytest.raises(ConfigError, match="add ~loss when an experiment= sets one"):
        _build_loss(cfg, "none", num_classes=10, embedding_dim=8)
    cfg = compose_config(["experiment=seed_cifar10", "supervision=none", "~loss"], tmp_path, tmp_path, tiny=False)
    loss, _ = _build_loss(cfg, "none", num_classes=10, embedding_dim=8)
    assert isinstance(loss, NTXentLoss)  # the default method's loss, simclr
