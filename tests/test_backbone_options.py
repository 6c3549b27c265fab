"""Backbone and head options of the paper recipes: pooling, BatchNorm freezing, head initialisation, BN-Inception with
its released weights' key names, and its BGR 0-255 input convention through every preprocessing path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from metricsearch.data.gpu_augment import BatchAugment
from metricsearch.data.transforms import build_eval_transform, build_train_transform
from metricsearch.inference.export import check_parity, export_onnx
from metricsearch.inference.model_loading import OnnxEmbedder, TorchEmbedder, load_embedder
from metricsearch.models.backbone import UNREACHABLE_WEIGHTS, PretrainedWeightsError, TimmBackbone, weights_source
from metricsearch.models.bn_inception import WEIGHTS_URL, BNInception, WeightsFileError
from metricsearch.models.embedding_model import build_embedding_model
from metricsearch.models.head import EmbeddingHead
from metricsearch.models.model_config import ModelConfig, ModelConfigError
from tests.helpers import compose_config

# BN-Inception's Caffe preprocessing: BGR, 0-255, minus this mean (BGR order), std 1; in timm's 0-1 convention.
CAFFE_MEAN = (104.0, 117.0, 128.0)
BGR_MEAN = [m / 255 for m in CAFFE_MEAN]
BGR_STD = [1 / 255] * 3


def by_hand_avg_plus_max(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.mean(dim=(2, 3)) + feature_map.amax(dim=(2, 3))


# Pooling


@pytest.mark.parametrize("model_name", ["resnet10t", "bn_inception"])
def test_avg_plus_max_pooling_is_the_sum_of_average_and_max_pooling(model_name):
    torch.manual_seed(0)
    backbone = TimmBackbone(model_name, global_pool="avg+max").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature_map = backbone.model.forward_features(images)
        pooled = backbone(images)
    assert backbone.global_pool == "avg+max"
    assert pooled.shape == (2, backbone.num_features) == (2, feature_map.shape[1])
    torch.testing.assert_close(pooled, by_hand_avg_plus_max(feature_map), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("global_pool", "by_hand"),
    [
        (None, lambda f: f.mean(dim=(2, 3))),
        ("avg", lambda f: f.mean(dim=(2, 3))),
        ("max", lambda f: f.amax(dim=(2, 3))),
        # timm's own: half the sum, and the concatenation (twice the features).
        ("avgmax", lambda f: 0.5 * (f.mean(dim=(2, 3)) + f.amax(dim=(2, 3)))),
        ("catavgmax", lambda f: torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)),
    ],
)
@pytest.mark.parametrize("model_name", ["resnet10t", "bn_inception"])
def test_timm_pooling_choices_pass_through_unchanged(model_name, global_pool, by_hand):
    torch.manual_seed(0)
    backbone = TimmBackbone(model_name, global_pool=global_pool).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = by_hand(backbone.model.forward_features(images))
        pooled = backbone(images)
    assert backbone.num_features == expected.shape[1]
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def test_vits_take_their_own_pooling_and_refuse_a_cnn_one():
    assert TimmBackbone("vit_tiny_patch16_224", img_size=32).global_pool == "token"
    assert TimmBackbone("vit_tiny_patch16_224", img_size=32, global_pool="avg").global_pool == "avg"
    with pytest.raises(ValueError, match=r"global_pool=avg\+max pools a CNN's feature map.*ViTs: token or avg"):
        TimmBackbone("vit_tiny_patch16_224", img_size=32, global_pool="avg+max")
    with pytest.raises(ValueError, match="global_pool='median' is not a pooling resnet10t supports"):
        TimmBackbone("resnet10t", global_pool="median")


# BatchNorm freezing


def _bn_state_after_training(bn_freeze: str) -> tuple[dict, dict, dict, dict]:
    """Running statistics and affine weights of every BatchNorm before and after three SGD steps in train mode."""
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet10t", bn_freeze=bn_freeze)
    norms = backbone._batch_norms()

    def snapshot(names: tuple[str, ...]) -> dict:
        return {(i, n): getattr(m, n).detach().clone() for i, m in enumerate(norms) for n in names}

    stats_before, affine_before = snapshot(("running_mean", "running_var")), snapshot(("weight", "bias"))
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    backbone.train()
    for _ in range(3):
        loss = backbone(torch.randn(4, 3, 32, 32)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return stats_before, snapshot(("running_mean", "running_var")), affine_before, snapshot(("weight", "bias"))


def _all_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _none_equal(a: dict, b: dict) -> bool:
    return not any(torch.equal(a[k], b[k]) for k in a)


def _mostly_changed(a: dict, b: dict) -> bool:
    # NOTE: not all: behind timm's zero-initialised last BatchNorm of a residual block, a weight's first gradients
    # are too small to move a float32 1.0 in three steps.
    return sum(not torch.equal(a[k], b[k]) for k in a) > 0.8 * len(a)


def test_bn_freeze_none_updates_statistics_and_weights():
    stats_before, stats_after, affine_before, affine_after = _bn_state_after_training("none")
    assert _none_equal(stats_before, stats_after)
    assert _mostly_changed(affine_before, affine_after)


def test_bn_freeze_stats_keeps_statistics_bit_identical_while_the_affine_weights_train():
    stats_before, stats_after, affine_before, affine_after = _bn_state_after_training("stats")
    assert _all_equal(stats_before, stats_after)
    assert _mostly_changed(affine_before, affine_after)
    backbone = TimmBackbone("resnet10t", bn_freeze="stats")
    assert all(p.requires_grad for m in backbone._batch_norms() for p in m.parameters())


def test_bn_freeze_all_keeps_statistics_and_affine_weights():
    stats_before, stats_after, affine_before, affine_after = _bn_state_after_training("all")
    assert _all_equal(stats_before, stats_after)
    assert _all_equal(affine_before, affine_after)
    backbone = TimmBackbone("resnet10t", bn_freeze="all")
    assert not any(p.requires_grad for m in backbone._batch_norms() for p in m.parameters())


def test_freeze_bn_is_still_read_from_older_model_configs():
    assert TimmBackbone("resnet10t", freeze_bn=True).bn_freeze == "all"
    assert TimmBackbone("resnet10t", freeze_bn=False).bn_freeze == "none"
    assert TimmBackbone("resnet10t", freeze_bn=True, bn_freeze="all").bn_freeze == "all"
    assert TimmBackbone("resnet10t").bn_freeze == "none"
    with pytest.raises(ValueError, match="freeze_bn=false .* contradicts backbone.bn_freeze=stats"):
        TimmBackbone("resnet10t", freeze_bn=False, bn_freeze="stats")
    with pytest.raises(ValueError, match="bn_freeze='yes' is not one of none, stats, all"):
        TimmBackbone("resnet10t", bn_freeze="yes")


# Head initialisation


def test_kaiming_fan_out_head_init_has_the_expected_spread_and_zero_bias():
    torch.manual_seed(0)
    head = EmbeddingHead(1024, embedding_dim=512, init="kaiming_fan_out")
    weight = head.projection.weight.detach()
    expected_std = (2 / 512) ** 0.5
    # 524,288 draws: the sample std is within a fraction of a percent of the true one; 3 % is generous.
    assert abs(weight.std().item() / expected_std - 1) < 0.03
    assert abs(weight.mean().item()) < 0.03 * expected_std
    assert torch.count_nonzero(head.projection.bias) == 0
    torch.manual_seed(0)
    default = EmbeddingHead(1024, embedding_dim=512).projection
    # PyTorch's default: uniform in +-1/sqrt(fan_in), std 1/sqrt(3 * 1024), about a fifth of the above.
    assert abs(default.weight.std().item() / (1 / (3 * 1024) ** 0.5) - 1) < 0.03
    assert torch.count_nonzero(default.bias) > 0
    with pytest.raises(ValueError, match="head.init='xavier' is not one of default, kaiming_fan_out"):
        EmbeddingHead(8, 4, init="xavier")


# BN-Inception


@pytest.mark.parametrize(("size", "side"), [(224, 7), (227, 7), (64, 2)])
def test_bn_inception_shapes(size, side):
    model = timm.create_model("bn_inception", num_classes=10).eval()
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert model.forward_features(images).shape == (1, 1024, side, side)
        assert model(images).shape == (1, 10)
        assert model.forward_head(model.forward_features(images), pre_logits=True).shape == (1, 1024)
    model.reset_classifier(0)
    assert model.get_classifier().__class__ is torch.nn.Identity
    backbone = TimmBackbone("bn_inception")
    assert backbone.num_features == 1024


def test_bn_inception_refuses_input_sizes_its_reduction_blocks_cannot_take():
    with pytest.raises(ValueError, match="BN-Inception cannot take this input size"):
        BNInception(num_classes=0).eval()(torch.randn(1, 3, 120, 120))


def test_bn_inception_data_config_is_the_caffe_convention():
    config = TimmBackbone("bn_inception").data_config
    assert config["channel_order"] == "BGR"
    assert config["input_size"] == (3, 224, 224)
    torch.testing.assert_close(torch.tensor(config["mean"]) * 255, torch.tensor(CAFFE_MEAN))
    torch.testing.assert_close(torch.tensor(config["std"]) * 255, torch.ones(3))
    assert TimmBackbone("resnet10t").data_config["channel_order"] == "RGB"


def released_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the released file's key names and stored shapes (BatchNorm vectors as (1, C), no
    num_batches_tracked, a 1000-class ``last_linear``)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in BNInception(num_classes=1000).state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        value = torch.randn(tensor.shape, generator=generator)
        if "_bn." in name:
            value = value.abs().unsqueeze(0) if name.endswith("running_var") else value.unsqueeze(0)
        state[name] = value
    return state


def test_bn_inception_has_the_released_files_key_names():
    names = set(released_like_state_dict())
    for key in (
        "conv1_7x7_s2.weight",
        "conv1_7x7_s2_bn.running_var",
        "inception_3a_1x1.weight",
        "inception_3a_double_3x3_reduce_bn.weight",
        "inception_3c_double_3x3_2.bias",
        "inception_5b_pool_proj_bn.running_mean",
        "last_linear.weight",
    ):
        assert key in names
    assert not any("3c_1x1" in k or "4e_1x1" in k or "3c_pool_proj" in k for k in names)


def test_bn_inception_weights_file_lands_in_the_network(tmp_path):
    released = released_like_state_dict()
    path = tmp_path / "bn_inception-52deb4733.pth"
    torch.save(released, path)
    backbone = TimmBackbone("bn_inception", weights_file=str(path))
    loaded = backbone.model.state_dict()
    features = [k for k in released if not k.startswith("last_linear.")]
    assert set(features) == {k for k in loaded if not k.endswith("num_batches_tracked")}
    for name in features:
        assert torch.equal(loaded[name], released[name].reshape(loaded[name].shape)), name
    # A classifier of the same shape is taken too.
    classifier = timm.create_model("bn_inception", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(classifier.last_linear.weight, released["last_linear.weight"])


def test_another_models_file_is_refused_naming_the_tensors(tmp_path):
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(WeightsFileError, match=r"is not BN-Inception's weights file: \d+ missing, \d+ unexpected"):
        TimmBackbone("bn_inception", weights_file=str(tmp_path / "resnet.pth"))
    damaged = released_like_state_dict()
    del damaged["inception_4d_3x3.weight"]
    damaged["inception_4d_3x3_bn.bias"] = torch.zeros(7)
    torch.save(damaged, tmp_path / "damaged.pth")
    with pytest.raises(WeightsFileError, match=r"1 missing.*inception_4d_3x3_bn.bias \(7,\).*inception_4d_3x3.weight"):
        TimmBackbone("bn_inception", weights_file=str(tmp_path / "damaged.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(WeightsFileError, match="is not a readable PyTorch state dict"):
        TimmBackbone("bn_inception", weights_file=str(tmp_path / "junk.pth"))


def test_an_unreachable_weights_url_raises_what_the_backbone_reports_as_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # Port 9 (discard) on the loopback: refused at once, like a machine without internet.
    overlay = dict(url="http://127.0.0.1:9/bn_inception-52deb4733.pth")
    with pytest.raises(UNREACHABLE_WEIGHTS):
        timm.create_model("bn_inception", pretrained=True, pretrained_cfg_overlay=overlay)
    # ... which the backbone turns into PretrainedWeightsError naming where the weights come from.
    assert weights_source("bn_inception") == WEIGHTS_URL
    assert weights_source("resnet50.tv_in1k") == "Hugging Face hub"
    with pytest.raises(PretrainedWeightsError, match="backbone.weights_file=.*does not exist"):
        TimmBackbone("bn_inception", weights_file=str(tmp_path / "missing.pth"))


# The BGR 0-255 input convention


def known_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


def bgr_by_hand(rgb: np.ndarray) -> torch.Tensor:
    """BGR pixels on the 0-255 scale minus the Caffe mean, channels first."""
    bgr = torch.from_numpy(rgb[..., ::-1].astype(np.float32).copy()).permute(2, 0, 1)
    return bgr - torch.tensor(CAFFE_MEAN).view(3, 1, 1)


def test_pil_eval_and_train_transforms_give_bgr_0_255_minus_the_mean():
    rgb = known_image()
    expected = bgr_by_hand(rgb)
    evaluated = build_eval_transform(8, None, BGR_MEAN, BGR_STD, "BGR")(Image.fromarray(rgb))
    torch.testing.assert_close(evaluated, expected, atol=1e-3, rtol=0)
    # The whole image, unflipped: scale 1 and no flip make the random crop the identity.
    train = build_train_transform(8, (1.0, 1.0), False, BGR_MEAN, BGR_STD, "BGR")
    trained = train(Image.fromarray(rgb), np.random.default_rng(0))
    torch.testing.assert_close(trained, expected, atol=1e-3, rtol=0)


def test_uint8_path_gives_bgr_0_255_minus_the_mean():
    rgb = known_image()
    expected = bgr_by_hand(rgb)
    augment = BatchAugment(8, BGR_MEAN, BGR_STD, "BGR")
    images = torch.from_numpy(rgb)[None]
    torch.testing.assert_close(augment.normalize_uint8(images)[0], expected, atol=1e-3, rtol=0)
    whole = augment(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([False]))
    torch.testing.assert_close(whole[0], expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="channel_order='GBR' is not one of RGB, BGR"):
        BatchAugment(8, BGR_MEAN, BGR_STD, "GBR")


def test_the_training_pipeline_hands_the_backbones_channel_order_to_the_data(tmp_path, data_dir):
    from metricsearch.pipelines.train import build_run

    cfg = compose_config(["backbone=bn_inception", "backbone.pretrained=false", "data.cache=uint8"], tmp_path, data_dir)
    _, datamodule = build_run(cfg)
    assert datamodule.augment.channel_order == "BGR"
    assert datamodule.train_transform.to_channel_order.channel_order == "BGR"
    assert datamodule.eval_transform.transforms[-2].channel_order == "BGR"


def bgr_model_config() -> tuple[dict, torch.nn.Module]:
    """A small network's config with the BGR convention, as training writes it for a BGR backbone."""
    model = build_embedding_model(
        {"_target_": "metricsearch.models.backbone.TimmBackbone", "model_name": "resnet10t"},
        {"_target_": "metricsearch.models.head.EmbeddingHead", "_partial_": True, "embedding_dim": 8},
    )
    config = ModelConfig.describe(
        model,
        {"_target_": "metricsearch.models.backbone.TimmBackbone", "model_name": "resnet10t"},
        {"_target_": "metricsearch.models.head.EmbeddingHead", "_partial_": True, "embedding_dim": 8},
        image_size=8,
        resize_size=None,
    )
    return {**config.to_dict(), "mean": BGR_MEAN, "std": BGR_STD, "channel_order": "BGR"}, model


def test_model_config_round_trips_the_channel_order():
    config = ModelConfig.describe(
        build_embedding_model(
            {"_target_": "metricsearch.models.backbone.TimmBackbone", "model_name": "bn_inception"},
            {"_target_": "metricsearch.models.head.EmbeddingHead", "_partial_": True, "embedding_dim": 8},
        ),
        {"_target_": "metricsearch.models.backbone.TimmBackbone", "model_name": "bn_inception"},
        {"_target_": "metricsearch.models.head.EmbeddingHead", "_partial_": True, "embedding_dim": 8},
        image_size=224,
        resize_size=256,
    )
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["channel_order"] == "BGR"
    assert ModelConfig.from_dict(stored) == config
    assert config.preprocessing["channel_order"] == "BGR"
    older = {k: v for k, v in stored.items() if k != "channel_order"}
    assert ModelConfig.from_dict(older).channel_order == "RGB"
    assert "channel_order" not in ModelConfig.from_dict(older).to_dict()
    with pytest.raises(ModelConfigError, match="channel_order 'RBG' is not one of RGB, BGR"):
        ModelConfig.from_dict({**stored, "channel_order": "RBG"})


def test_checkpoint_and_onnx_embedders_apply_the_channel_order(tmp_path):
    model_config, model = bgr_model_config()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": model_config}}, tmp_path / "bgr.ckpt")
    embedder = load_embedder(ckpt=tmp_path / "bgr.ckpt")
    rgb = known_image()
    torch.testing.assert_close(embedder.preprocess([Image.fromarray(rgb)])[0], bgr_by_hand(rgb), atol=1e-3, rtol=0)
    onnx_embedder = OnnxEmbedder(export_onnx(embedder, tmp_path / "bgr.onnx"))
    assert onnx_embedder.preprocessing["channel_order"] == "BGR"
    assert onnx_embedder.fingerprint == embedder.fingerprint
    torch.testing.assert_close(
        onnx_embedder.preprocess([Image.fromarray(rgb)]), embedder.preprocess([Image.fromarray(rgb)])
    )
    # The same weights read as RGB are another model: the fingerprint covers the channel order.
    rgb_config = {k: v for k, v in model_config.items() if k != "channel_order"}
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": rgb_config}}, tmp_path / "rgb.ckpt")
    assert load_embedder(ckpt=tmp_path / "rgb.ckpt").fingerprint != embedder.fingerprint


def test_bn_inception_with_summed_pooling_exports_to_onnx(tmp_path):
    backbone = {"_target_": "metricsearch.models.backbone.TimmBackbone", "model_name": "bn_inception"}
    backbone["global_pool"] = "avg+max"
    head = {"_target_": "metricsearch.models.head.EmbeddingHead", "_partial_": True, "embedding_dim": 8}
    model = build_embedding_model(backbone, head)
    embedder = TorchEmbedder(
        model, ModelConfig.describe(model, backbone, head, 64, 64), {"kind": "backbone", "path": "x"}
    )
    onnx_embedder = OnnxEmbedder(export_onnx(embedder, tmp_path / "bn_inception.onnx"))
    assert onnx_embedder.preprocessing["channel_order"] == "BGR"
    assert check_parity(embedder, onnx_embedder, torch.randn(2, 3, 64, 64)) < 1e-4
