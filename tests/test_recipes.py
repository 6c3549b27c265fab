"""The paper recipes in conf/experiment/: each card's official settings hold in the composed config, and each recipe
runs a few steps on a miniature copy of its dataset (random weights instead of the pretrained ones)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from metricsearch.utils.config import CONFIG_DIR
from tests.cifar_fixtures import make_cifar10
from tests.dataset_fixtures import make_cars_flat, make_cub, make_sop
from tests.helpers import compose_config
from tests.inshop_fixtures import make_inshop

EXPERIMENTS = CONFIG_DIR / "experiment"
# The recipes that must ship: Proxy-Anchor R50 (CUB, Cars) and BN-Inception (CUB, Cars, SOP), Multi-Similarity
# BN-Inception (CUB, Cars, SOP), the Reality Check's shared base, XBM on SOP, ViT-S/16 DINO (CUB, Cars, SOP); and
# Proxy-Anchor BN-Inception on In-Shop and the Keras CIFAR-10 example.
REQUIRED = (
    "cub_proxy_anchor_r50",
    "cars196_proxy_anchor_r50",
    "cub_proxy_anchor_bninception",
    "cars196_proxy_anchor_bninception",
    "sop_proxy_anchor_bninception",
    "cub_multi_similarity_bninception",
    "cars196_multi_similarity_bninception",
    "sop_multi_similarity_bninception",
    "mlrc_base",
    "sop_contrastive_xbm_r50",
    "cub_ntxent_vits_dino",
    "cars196_ntxent_vits_dino",
    "sop_ntxent_vits_dino",
    "inshop_proxy_anchor_bninception",
    "seed_cifar10",
)
CARD_FIELDS = (
    "title",
    "paper",
    "code",
    "published",
    "published_protocol",
    "published_row",
    "expected_gap",
    "sources",
    "official",
    "differences",
)
# A card's `sources` name official repositories at a commit: owner/name@hash.
SOURCE_REPO = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{7,40}$")
# Each official setting's comment opens with where it comes from: ALIAS:path:line (line or range, or ::symbol) of a
# source the card names, or the paper (section / table), or `ours:` for a value the card's differences declare.
CITATION = re.compile(r"^(?P<alias>\w+):(?P<path>[\w./-]+)(?::(?P<line>\d+(?:-\d+)?)|::\w+)(?:\s|$)")
# The datasets each recipe is for: its own data config unless the card lists several (`datasets`).
DATA_ROOTS = {
    "CUBSource": "cub",
    "Cars196Source": "cars196",
    "SOPSource": "sop",
    "InShopSource": "inshop",
    "CIFAR10Source": "cifar10",
}


def recipes() -> list[str]:
    """Every experiment whose YAML carries a recipe card."""
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if "recipe" in OmegaConf.load(p))


def recipe_datasets() -> list[tuple[str, str]]:
    """(recipe, data config) for every dataset each recipe names: its card's `datasets`, else its own data."""
    pairs = []
    for recipe in recipes():
        card = OmegaConf.load(EXPERIMENTS / f"{recipe}.yaml").recipe
        names = card.get("datasets") or [None]
        pairs += [(recipe, name) for name in names]
    return pairs


def official_comments(recipe: str) -> dict[str, str]:
    """Each line of the card's `official` block as written: setting -> its comment ('' when it has none)."""
    lines = (EXPERIMENTS / f"{recipe}.yaml").read_text().splitlines()
    start = lines.index("  official:")
    comments = {}
    for line in lines[start + 1 :]:
        if not line.startswith("    "):
            break
        setting, _, rest = line.strip().partition(":")
        comments[setting] = rest.partition(" # ")[2].strip() if " # " in rest else ""
    return comments


def cited(comment: str, aliases: set[str]) -> bool:
    """Whether a comment opens with a source: ALIAS:path:line of a named source, the paper, or `ours:`."""
    match = CITATION.match(comment)
    if match and match.group("alias") in aliases:
        return True
    return comment.startswith(("paper ", "ours: "))


def same(actual, expected) -> bool:
    if isinstance(expected, float) and isinstance(actual, int | float) and not isinstance(actual, bool):
        return math.isclose(actual, expected, rel_tol=1e-9)
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(map(same, actual, expected))
    return actual == expected


def test_every_recipe_of_the_issue_ships_with_a_card():
    assert set(REQUIRED) <= set(recipes())


@pytest.mark.parametrize("recipe", recipes())
def test_the_card_opens_the_file_and_says_everything(recipe):
    text = (EXPERIMENTS / f"{recipe}.yaml").read_text()
    assert text.index("\nrecipe:") < text.index("\ndefaults:"), "the recipe card must open the YAML"
    card = OmegaConf.to_container(OmegaConf.load(EXPERIMENTS / f"{recipe}.yaml").recipe)
    assert [field for field in CARD_FIELDS if field not in card] == []
    assert card["official"], "a card lists the official settings it follows"
    assert card["code"].startswith("https://github.com/")
    assert card["published_protocol"] in ("val", "last", "test_best")
    assert isinstance(card["differences"], list) and all(isinstance(d, str) and d for d in card["differences"])
    published = card["published"]
    assert published is None or all(0 < value <= 100 for value in published.values())
    assert all(SOURCE_REPO.match(repo) for repo in card["sources"].values()), card["sources"]
    assert isinstance(card["expected_gap"], str) and card["expected_gap"]


@pytest.mark.parametrize("recipe", recipes())
def test_every_official_setting_names_its_source(recipe):
    card = OmegaConf.load(EXPERIMENTS / f"{recipe}.yaml").recipe
    aliases = set(card.sources)
    comments = official_comments(recipe)
    assert set(comments) == set(card.official), "every official line is one `setting: value  # source` line"
    assert {setting: c for setting, c in comments.items() if not cited(c, aliases)} == {}
    if any(c.startswith("ours: ") for c in comments.values()):
        assert card.differences, "a value of ours in the official block is declared among the differences"


@pytest.mark.parametrize("recipe", recipes())
def test_a_published_number_carries_its_row(recipe):
    """A printed number names its row (model, embedding size, dataset) and where it was read; a number that could
    not be verified is not printed, and the row says so."""
    card = OmegaConf.load(EXPERIMENTS / f"{recipe}.yaml").recipe
    row = card.published_row
    assert isinstance(row, str) and row
    if card.published:
        assert cited(row, set(card.sources)), f"{recipe}: the published number's row names no source: {row}"
        assert not row.startswith(("not verified", "none")), row
        assert re.search(r"\d+-d", row), f"{recipe}: the row states the embedding size: {row}"
    else:
        assert row.startswith(("not verified", "none")), f"{recipe}: without a number, the row says why: {row}"


def test_a_card_setting_without_its_source_is_caught():
    assert not cited("the backbone's global average pooling", {"MS"})
    assert not cited("XX:configs/example.yaml:15 an alias the card does not name", {"MS"})
    assert not cited("MS:configs/example.yaml a path without its line", {"MS"})
    assert cited("MS:configs/example.yaml:15 OPTIMIZER_NAME Adam", {"MS"})
    assert cited("MS:ret_benchmark/solver/build.py:21-22 WarmupMultiStepLR", {"MS"})


@pytest.mark.parametrize("recipe", recipes())
def test_every_carded_value_is_what_the_recipe_runs(recipe, tmp_path):
    cfg = compose_config([f"experiment={recipe}"], tmp_path, tmp_path, tiny=False)
    official = OmegaConf.to_container(cfg.recipe.official, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    wrong = {}
    for key, expected in official.items():
        node: object = resolved
        for part in key.split("."):
            node = node.get(part, "<missing>") if isinstance(node, dict) else "<missing>"
        if not same(node, expected):
            wrong[key] = (node, expected)
    assert wrong == {}, f"{recipe}: setting (composed, carded official) that differ"


def test_a_card_that_disagrees_with_its_settings_is_caught(tmp_path):
    cfg = compose_config(["experiment=cub_proxy_anchor_r50", "optimizer.lr=0.5"], tmp_path, tmp_path, tiny=False)
    assert not same(cfg.optimizer.lr, cfg.recipe.official["optimizer.lr"])


# --- every recipe runs a few steps on a miniature copy of its dataset, with random weights ---


@pytest.fixture(scope="module")
def miniature_roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("recipe_data")
    # Enough images per class for the recipes' m (5), few test classes to keep the evaluations short.
    make_cub(base / "CUB_200_2011", images_per_class=5, num_classes=110)
    make_cars_flat(base / "cars196", images_per_class=5)
    # SOP's real class sizes, 2 to 12 images: fewer than most recipes' m for the smallest classes.
    make_sop(base / "Stanford_Online_Products", classes_per_side=11, class_sizes=range(2, 13))
    make_inshop(base / "Inshop_Clothes", train_items=12, test_items=6)
    make_cifar10(base / "cifar-10-batches-py", per_class_train=10, per_class_test=2)
    return {
        "cub": base / "CUB_200_2011",
        "cars196": base / "cars196",
        "sop": base / "Stanford_Online_Products",
        "inshop": base / "Inshop_Clothes",
        "cifar10": base / "cifar-10-batches-py",
    }


def run_overrides(recipe: str, cfg, root: Path) -> list[str]:
    """The recipe shrunk to two training steps at 32 px on the CPU, validation and test included."""
    m = OmegaConf.select(cfg, "sampler.m", default=None)
    batch = 2 * m if m else 8
    overrides = [
        f"data.root={root}",
        "backbone.pretrained=false",
        "backbone.weights_file=null",
        "data.image_size=32",
        "data.resize_size=32",
        f"data.batch_size={batch}",
        "data.eval_batch_size=64",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.max_steps=2",
        "trainer.limit_train_batches=2",
        "trainer.val_check_interval=1.0",
        "trainer.check_val_every_n_epoch=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "test_untrained=false",
        "module.compute_nmi=false",
        "callbacks.visualization.every_n_epochs=0",
        "callbacks.visualization.method=pca",
    ]
    if OmegaConf.select(cfg, "module.xbm_memory_size", default=0):
        overrides.append("module.xbm_start_step=0")  # so that the two steps use the memory
    return overrides


@pytest.mark.parametrize(("recipe", "data"), recipe_datasets())
def test_the_recipe_runs_on_a_miniature_copy(recipe, data, miniature_roots, tmp_path):
    """Every recipe starts and trains two steps on a fabricated copy of each dataset it names (SOP at its real class
    sizes of 2-12 images), so that no recipe fails at start-up on one of its datasets."""
    from metricsearch.pipelines.train import train

    extra = [f"data={data}"] if data else []
    cfg = compose_config([f"experiment={recipe}", *extra], tmp_path, tmp_path, tiny=False)
    root = DATA_ROOTS[str(cfg.data.source._target_).rsplit(".", 1)[-1]]
    cfg = compose_config(
        [f"experiment={recipe}", *extra, *run_overrides(recipe, cfg, miniature_roots[root])],
        tmp_path,
        tmp_path,
        tiny=False,
    )
    metrics = train(cfg)

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["global_step"] == 2
    assert 0.0 <= summary["metrics"]["test"]["recall@1"] <= 1.0
    if root == "inshop":
        # The query_gallery protocol: the 6 test items' 2 queries each, searched in their 3 gallery images each.
        assert summary["metrics"]["test"]["num_queries"] == 12 and "recall@50" in summary["metrics"]["test"]
    if root == "cifar10":
        # The closed-set protocol: the 10 classes' 2 test images each, searched among themselves; the confusion matrix.
        assert summary["metrics"]["test"]["num_queries"] == 20
        assert (tmp_path / "plots" / "confusion_test.png").is_file()
    assert summary["selection"]["mode"] == cfg.selection
    assert summary["selection"]["optimistic"] == (cfg.selection == "test_best")
    if cfg.selection == "test_best":
        assert any(key.startswith("test_epoch/") for key in metrics)


@pytest.mark.parametrize("recipe", ["cub_proxy_anchor_r50", "cars196_proxy_anchor_bninception"])
def test_proxy_anchor_warm_up_then_every_backbone_parameter_trains_with_bn_statistics_frozen(
    recipe, miniature_roots, tmp_path
):
    """The official loop with --warm and --bn-freeze 1 (code/train.py:266-287): during warm-up only the embedding and
    the proxies train; from the end of warm-up on every backbone parameter trains, BatchNorm's affine weights
    included, while BatchNorm stays in eval mode so its running statistics never move. A small CNN stands in for
    the recipe's backbone; every other setting is the recipe's."""
    import lightning as L
    import torch

    from metricsearch.pipelines.train import build_run
    from metricsearch.utils.trainer_settings import quiet_trainer_settings

    cfg = compose_config([f"experiment={recipe}"], tmp_path, tmp_path, tiny=False)
    root = miniature_roots[DATA_ROOTS[str(cfg.data.source._target_).rsplit(".", 1)[-1]]]
    overrides = [*run_overrides(recipe, cfg, root), "backbone.model_name=resnet10t", "module.warmup_epochs=1"]
    cfg = compose_config([f"experiment={recipe}", *overrides], tmp_path, tmp_path, tiny=False)
    L.seed_everything(0)
    module, datamodule = build_run(cfg)
    backbone = module.model.backbone

    def state() -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in backbone.state_dict().items()}

    snapshots = [state()]

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append(state())

    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        accelerator="cpu",
        use_distributed_sampler=False,
        callbacks=[Snapshot()],
        **quiet_trainer_settings(),
    )
    trainer.fit(module, datamodule=datamodule)
    initial, after_warm_up, after_training = snapshots
    parameters = [name for name, _ in backbone.named_parameters()]
    statistics = [name for name in initial if name.endswith(("running_mean", "running_var"))]
    batch_norm_affine = [name for name in parameters if name.rsplit(".", 1)[0] + ".running_mean" in initial]
    assert statistics and batch_norm_affine
    assert [n for n in parameters if not torch.equal(initial[n], after_warm_up[n])] == [], "warm-up moved the backbone"
    assert [n for n in parameters if torch.equal(after_warm_up[n], after_training[n])] == [], (
        "after warm-up every backbone parameter trains, BatchNorm's affine weights included"
    )
    assert [n for n in statistics if not torch.equal(initial[n], after_training[n])] == [], "BN statistics moved"


@pytest.mark.parametrize("recipe", [r for r in recipes() if "multi_similarity_bninception" in r])
def test_multi_similarity_bninception_embeds_after_global_max_pooling(recipe, tmp_path):
    """research-ms-loss's BN-Inception takes the embedding after F.adaptive_max_pool2d (bninception.py:505-507),
    not average pooling: the recipe's backbone must pool the same way, on a real forward pass."""
    import torch

    from metricsearch.models.backbone import TimmBackbone

    cfg = compose_config([f"experiment={recipe}"], tmp_path, tmp_path, tiny=False)
    backbone = TimmBackbone(cfg.backbone.model_name, global_pool=cfg.backbone.global_pool).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feature_map = backbone.model.forward_features(images)
        pooled = backbone(images)
    torch.testing.assert_close(pooled, feature_map.amax(dim=(2, 3)))
