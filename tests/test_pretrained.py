"""Offline ImageNet weights for EfficientNet-Lite0: the mapping is checked, the network sees, search works untrained."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageEnhance

from metricsearch.data.transforms import build_eval_transform
from metricsearch.inference.model_loading import load_embedder
from metricsearch.inference.predict_embeddings import make_predict_trainer
from metricsearch.models.backbone import PretrainedWeightsError, TimmBackbone
from metricsearch.models.pretrained import (
    WeightMappingError,
    create_imagenet_classifier,
    efficientnet_lite0_imagenet,
    load_imagenet_state_dict,
    map_state_dict,
)
from metricsearch.pipelines.index import build_index, search_files
from tests.search_fixtures import photo, write_photos

# ImageNet-1k class ids of domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = set(range(281, 286))
ESPRESSO, CUP = 967, 968


@pytest.fixture(scope="module")
def classifier():
    return create_imagenet_classifier()


def _imagenet_top5(classifier, image: Image.Image) -> list[int]:
    # The evaluation recipe of the weights: 224 centre crop of a 256 resize, mean and std 0.5.
    batch = build_eval_transform(224, 256, (0.5,) * 3, (0.5,) * 3)(image)[None]
    with torch.inference_mode():
        return classifier(batch).topk(5).indices[0].tolist()


def test_the_network_recognises_real_photos(classifier):
    assert CAT_CLASSES & set(_imagenet_top5(classifier, photo("chelsea")))
    assert {ESPRESSO, CUP} & set(_imagenet_top5(classifier, photo("coffee")))


def test_every_tensor_is_mapped_in_order_with_its_shape():
    weights = load_imagenet_state_dict()
    assert len(weights) == 296
    names = list(weights)
    assert names[0] == "conv_stem.weight" and names[-2:] == ["classifier.weight", "classifier.bias"]
    assert weights["classifier.weight"].shape == (1000, 1280)


def test_the_backbone_option_carries_the_imagenet_features(classifier):
    backbone = efficientnet_lite0_imagenet()
    assert backbone.num_features == 1280
    assert backbone.data_config["mean"] == (0.5, 0.5, 0.5) and backbone.data_config["input_size"] == (3, 224, 224)
    reference = classifier.state_dict()
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    untrained = efficientnet_lite0_imagenet(pretrained=False)
    assert not torch.equal(untrained.model.conv_stem.weight, backbone.model.conv_stem.weight)


def _template() -> OrderedDict:
    return OrderedDict(
        [("conv.weight", torch.zeros(4, 3, 3, 3)), ("bn.weight", torch.zeros(4)), ("bn.bias", torch.zeros(4))]
    )


def test_a_wrong_shape_a_swapped_pair_or_a_missing_tensor_fails_loudly():
    good = OrderedDict(
        [("_c.weight", torch.ones(4, 3, 3, 3)), ("_b.weight", torch.ones(4)), ("_b.bias", torch.ones(4))]
    )
    assert list(map_state_dict(good, _template())) == ["conv.weight", "bn.weight", "bn.bias"]
    wrong_shape = OrderedDict([("_c.weight", torch.ones(4, 3, 5, 5)), *list(good.items())[1:]])
    with pytest.raises(WeightMappingError, match=r"tensor 0 does not fit: file has _c.weight \(4, 3, 5, 5\)"):
        map_state_dict(wrong_shape, _template())
    swapped = OrderedDict([list(good.items())[i] for i in (0, 2, 1)])
    with pytest.raises(WeightMappingError, match="tensor 1 does not fit: file has _b.bias"):
        map_state_dict(swapped, _template())
    with pytest.raises(WeightMappingError, match="has 2 tensors but timm's tf_efficientnet_lite0 has 3"):
        map_state_dict(OrderedDict(list(good.items())[:2]), _template())


def _augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A plausible re-take of the photo: cropped, mirrored, slightly rotated, brighter, recompressed."""
    width, height = image.size
    scale = rng.uniform(0.75, 0.9)
    w, h = int(width * scale), int(height * scale)
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    out = image.crop((x, y, x + w, y + h)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = out.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR, expand=False)
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(1.05, 1.25)))
    return out.resize((int(w * 0.8), int(h * 0.8)), Image.Resampling.BILINEAR)


def test_an_augmented_copy_of_a_real_photo_finds_the_photo_first(tmp_path):
    """Search with the pretrained backbone and no training: every re-take ranks its original first."""
    gallery = tmp_path / "photos"
    files = write_photos(gallery)
    embedder = load_embedder(backbone="efficientnet_lite0_imagenet")
    index = build_index(embedder, gallery, tmp_path / "index", trainer=make_predict_trainer(progress_bar=False))
    assert len(index) == len(files) and index.embedding_dim == 1280
    rng = np.random.default_rng(0)
    queries = []
    for name in files:
        query = tmp_path / "queries" / f"{name}.jpg"
        query.parent.mkdir(exist_ok=True)
        _augment(photo(name.removesuffix(".png")), rng).save(query, quality=75)
        queries.append(query)
    results = search_files(index, embedder, queries, k=3)
    firsts = [hits[0].path for hits in results]
    assert firsts == files


# --- hub weights offline: a one-line message that says how to supply them ---


@pytest.fixture
def empty_offline_hub(tmp_path, monkeypatch):
    """The Hugging Face hub as on a machine without internet: offline, and nothing in the cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_hub_weights_unreachable_say_how_to_supply_them(empty_offline_hub):
    with pytest.raises(PretrainedWeightsError) as raised:
        TimmBackbone("resnet10t", pretrained=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "needs its ImageNet weights from the internet" in message
    assert "backbone.weights_file=PATH" in message and "backbone.pretrained=false" in message


def test_a_local_weights_file_loads_offline(empty_offline_hub, tmp_path):
    reference = timm.create_model("resnet10t", pretrained=False)
    weights = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), weights)
    backbone = TimmBackbone("resnet10t", pretrained=True, weights_file=str(weights))
    loaded = backbone.model.state_dict()
    assert loaded.keys() == {k for k in reference.state_dict() if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], reference.state_dict()[k]) for k in loaded)


def test_a_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    for create in (
        lambda: TimmBackbone("resnet10t", weights_file=str(missing)),
        lambda: efficientnet_lite0_imagenet(weights_file=str(missing)),
    ):
        with pytest.raises(PretrainedWeightsError, match=f"backbone.weights_file={missing} does not exist"):
            create()
