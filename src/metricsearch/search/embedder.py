"""Embedders: images in, L2-normalised embeddings out, from a checkpoint, an ONNX file or a pretrained backbone.

Every way of building or searching an index goes through an :class:`Embedder`, which carries three things
besides the network: the preprocessing the network was trained with (so a query is resized and normalised
exactly like the gallery), the embedding size, and a *fingerprint* of the weights. The fingerprint is a
SHA-256 over every tensor of the embedding network and the preprocessing; it is what an index records and
checks, so an index is never searched with embeddings of another model. It does not depend on the file the
weights came from: a checkpoint and its ONNX export (which stores the fingerprint in its metadata) agree.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from metricsearch.data.transforms import build_eval_transform
from metricsearch.models.head import EmbeddingModel
from metricsearch.search.errors import ModelLoadError, shorten
from metricsearch.utils.config import CONFIG_DIR

PREPROCESSING_KEYS = ("image_size", "resize_size", "mean", "std")
# Keys of the metadata an ONNX export carries (ONNX metadata values are strings).
ONNX_MODEL_CONFIG = "metricsearch.model_config"
ONNX_FINGERPRINT = "metricsearch.fingerprint"
ONNX_EMBEDDING_DIM = "metricsearch.embedding_dim"
ONNX_SOURCE = "metricsearch.source"
# The head that turns a pretrained backbone's pooled features into embeddings without training.
NORMALIZE_HEAD_TARGET = "metricsearch.models.pretrained.NormalizeHead"
# The config groups whose options are the project's model parts: only their _target_s are ever instantiated from a
# checkpoint's or an index's model config.
MODEL_PART_GROUPS = ("backbone", "head")


def preprocessing_of(model_config: dict[str, Any]) -> dict[str, Any]:
    """The part of a model config that decides how an image becomes the network's input."""
    missing = [k for k in PREPROCESSING_KEYS if k not in model_config]
    if missing:
        raise ModelLoadError(f"the model config has no {', '.join(missing)}; cannot preprocess images for it")
    return {
        "image_size": int(model_config["image_size"]),
        "resize_size": None if model_config["resize_size"] is None else int(model_config["resize_size"]),
        "mean": [float(v) for v in model_config["mean"]],
        "std": [float(v) for v in model_config["std"]],
    }


def fingerprint_weights(state_dict: dict[str, torch.Tensor], preprocessing: dict[str, Any]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in name order, and the preprocessing.

    Two models get the same fingerprint exactly when they compute the same embeddings of the same files.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # NOTE: a byte view, not .numpy(): numpy has no bfloat16, and a view costs no copy.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class Embedder(ABC):
    """Turns images into embeddings with a fixed model and its own preprocessing.

    Attributes:
        model_config: the plain dict that rebuilds the network and its preprocessing (see
            :class:`~metricsearch.models.module.MetricLearningModule`).
        fingerprint: hex SHA-256 of the weights and preprocessing (see :func:`fingerprint_weights`).
        source: where the model came from, as recorded in an index: ``kind`` (checkpoint, onnx, backbone),
            ``path`` (a file, or a backbone name) and, for files, the file's ``sha256``.
    """

    def __init__(self, model_config: dict[str, Any], fingerprint: str, source: dict[str, Any]) -> None:
        self.model_config = model_config
        self.fingerprint = fingerprint
        self.source = source
        self.preprocessing = preprocessing_of(model_config)
        self.transform: Callable[[Image.Image], torch.Tensor] = build_eval_transform(**self.preprocessing)

    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """Size of the embeddings."""

    @abstractmethod
    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (float32, on the CPU) of a batch of preprocessed images ``[B, 3, H, W]``."""

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The network's input ``[len(images), 3, H, W]``: each RGB image resized, cropped and normalised."""
        return torch.stack([self.transform(image) for image in images])

    @property
    def resize_short_side(self) -> int:
        """The length the short side of every image is resized to before the centre crop."""
        return int(self.preprocessing["resize_size"] or self.preprocessing["image_size"])

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeddings ``[len(images), embedding_dim]`` of RGB images, preprocessed here."""
        return self.embed_tensor(self.preprocess(images)).numpy()

    def describe(self) -> str:
        """A short human-readable name: kind, file and fingerprint prefix."""
        return f"{self.source['kind']} {self.source['path']} (fingerprint {self.fingerprint[:12]})"


class TorchEmbedder(Embedder):
    """An :class:`EmbeddingModel` in eval mode; runs on whatever device the model is moved to.

    Args:
        model: backbone + head.
        model_config: how to rebuild ``model`` and preprocess its inputs.
        source: where the weights came from (see :class:`Embedder`).
    """

    def __init__(self, model: EmbeddingModel, model_config: dict[str, Any], source: dict[str, Any]) -> None:
        self.model = model.eval()
        super().__init__(model_config, fingerprint_weights(model.state_dict(), preprocessing_of(model_config)), source)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.head.embedding_dim)

    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            return self.model(images.to(device)).float().cpu()


class OnnxEmbedder(Embedder):
    """An ONNX export (see :mod:`metricsearch.search.export`) run by onnxruntime on the CPU.

    Its preprocessing and fingerprint come from the metadata the export wrote into the file.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers, CPU by default.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.path = Path(path).expanduser().resolve()
        self.providers = list(providers)
        self._session = self._open()
        meta = self._session.get_modelmeta().custom_metadata_map
        if ONNX_MODEL_CONFIG not in meta or ONNX_FINGERPRINT not in meta:
            raise ModelLoadError(
                f"model={self.path} has no MetricSearch metadata (preprocessing, fingerprint): export it with "
                "`python scripts/export.py ckpt=PATH format=onnx`"
            )
        self._embedding_dim = int(meta[ONNX_EMBEDDING_DIM])
        source = {"kind": "onnx", "path": str(self.path), "sha256": file_sha256(self.path)}
        super().__init__(json.loads(meta[ONNX_MODEL_CONFIG]), meta[ONNX_FINGERPRINT], source)

    def _open(self) -> Any:
        import onnxruntime as ort

        if not self.path.is_file():
            raise ModelLoadError(f"model={self.path} does not exist")
        try:
            session = ort.InferenceSession(str(self.path), providers=self.providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
            raise ModelLoadError(f"model={self.path} is not an ONNX model onnxruntime can run: {err}") from err
        self._input_name = session.get_inputs()[0].name
        return session

    # An InferenceSession cannot be pickled; DDP-spawn workers reopen the file instead.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_session"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._session = self._open()

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        inputs = images.detach().cpu().float().numpy()
        (outputs,) = self._session.run(None, {self._input_name: inputs})
        return torch.from_numpy(np.asarray(outputs, dtype=np.float32))


def backbone_options() -> list[str]:
    """The names of the backbone options, ``conf/backbone/NAME.yaml``, found by listing that folder."""
    return sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))


@functools.cache
def allowed_model_targets() -> frozenset[str]:
    """Every ``_target_`` the project's backbone and head options name (and the pretrained backbones' head).

    These are the only callables a model config from a file (checkpoint, index) may have instantiated.
    """

    def targets(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
            return own + [t for value in node.values() for t in targets(value)]
        if isinstance(node, list):
            return [t for value in node for t in targets(value)]
        return []

    found = {NORMALIZE_HEAD_TARGET}
    for group in MODEL_PART_GROUPS:
        for path in (CONFIG_DIR / group).glob("*.yaml"):
            found.update(targets(OmegaConf.to_container(OmegaConf.load(path))))
    return frozenset(found)


def check_model_config(config: Any, origin: str) -> None:
    """Refuses a model config that would instantiate anything but the project's own model parts.

    Hydra instantiates the callable any ``_target_`` names, at any depth, and resolves ``${...}`` interpolations
    (environment variables among them): a config read from a file someone handed over must name only the
    targets of :func:`allowed_model_targets` and hold no interpolation.

    Raises:
        ModelLoadError: one line naming the first offending value and ``origin`` (the file it came from).
    """
    allowed = allowed_model_targets()
    pending, seen = [(config, "model_config")], 0
    while pending:
        node, where = pending.pop()
        seen += 1
        if seen > 100_000:
            raise ModelLoadError(f"{origin}: the model config is implausibly large; the file is damaged or not trusted")
        if isinstance(node, dict):
            target = node.get("_target_")
            if "_target_" in node and target not in allowed:
                raise ModelLoadError(
                    f"{origin} asks to instantiate {shorten(target)} ({where}), which is not one of the project's "
                    f"model parts ({', '.join(sorted(allowed))}): refused, the file is damaged or not to be trusted"
                )
            pending.extend((value, f"{where}.{key}") for key, value in node.items())
        elif isinstance(node, list):
            pending.extend((value, f"{where}[{i}]") for i, value in enumerate(node))
        elif isinstance(node, str) and "${" in node:
            raise ModelLoadError(
                f"{origin}: the model config holds an interpolation {shorten(node)} ({where}): refused, the file is "
                "damaged or not to be trusted"
            )


def build_embedding_model(model_config: dict[str, Any], origin: str = "the model config") -> EmbeddingModel:
    """Backbone and head as ``model_config`` describes them (with random or pretrained weights, as configured).

    Raises:
        ModelLoadError: the config names something other than the project's model parts (see
            :func:`check_model_config`); ``origin`` says where it came from.
    """
    check_model_config(model_config, origin)
    if not isinstance(model_config.get("backbone"), dict) or not isinstance(model_config.get("head"), dict):
        raise ModelLoadError(f"{origin}: the model config has no backbone and head sections")
    backbone = instantiate(model_config["backbone"])
    head = instantiate(model_config["head"])
    if isinstance(head, functools.partial):
        head = head() if "in_features" in head.keywords else head(in_features=backbone.num_features)
    return EmbeddingModel(backbone, head)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"ckpt={path} does not exist")
    try:
        # weights_only: a checkpoint is data; never run code from a file someone handed us.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ModelLoadError(f"ckpt={path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err


def _check_state_dict_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Raises a readable error when ``state`` is not exactly the state dict of ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        examples = (wrong_shape + missing + unexpected)[:3]
        raise ModelLoadError(
            f"ckpt={path} does not fit the model its config describes ({name}): {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(wrong_shape)} wrongly shaped tensors (e.g. {'; '.join(examples)}). "
            "The checkpoint was written by another model or an incompatible version of the code."
        )


def load_checkpoint_embedder(path: str | Path) -> TorchEmbedder:
    """The embedding model of a training checkpoint (``MetricLearningModule``), in eval mode on the CPU.

    The network is rebuilt from ``hyper_parameters.model_config`` and filled with the ``model.*`` tensors of
    the state dict; anything that does not fit exactly is an error rather than a half-loaded model.

    Raises:
        ModelLoadError: not a file, not a checkpoint, not one of this project's, or weights that do not fit.
    """
    path = Path(path).expanduser().resolve()
    checkpoint = _read_checkpoint(path)
    model_config = (checkpoint.get("hyper_parameters") or {}).get("model_config")
    if not isinstance(model_config, dict):
        raise ModelLoadError(
            f"ckpt={path} has no hyper_parameters.model_config: it was not written by MetricSearch's training "
            "(python train.py ...), so the network and its preprocessing cannot be rebuilt from it"
        )
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise ModelLoadError(f"ckpt={path} holds no embedding-model weights (no 'model.*' keys in its state_dict)")
    # The checkpoint's own weights replace whatever the backbone starts with: never download or read others for it
    # (training already records pretrained=false; a checkpoint from elsewhere might not).
    build_config = model_config
    backbone_cfg = model_config.get("backbone")
    if isinstance(backbone_cfg, dict):
        no_weights = {
            key: value for key, value in {"pretrained": False, "weights_file": None}.items() if key in backbone_cfg
        }
        build_config = {**model_config, "backbone": {**backbone_cfg, **no_weights}}
    model = build_embedding_model(build_config, f"ckpt={path}")
    name = f"{model_config['backbone'].get('model_name', model_config['backbone']['_target_'])}"
    name += f" -> {model_config['head'].get('embedding_dim', '?')}-d head"
    _check_state_dict_fits(model, state, path, name)
    model.load_state_dict(state, strict=True)
    return TorchEmbedder(model, model_config, {"kind": "checkpoint", "path": str(path), "sha256": file_sha256(path)})


def load_backbone_embedder(name: str) -> TorchEmbedder:
    """A pretrained backbone ``conf/backbone/NAME.yaml`` (e.g. ``efficientnet_lite0_imagenet``) used as is.

    The head only L2-normalises the pooled features, and the preprocessing is the backbone's own (timm's
    data config: its input size, the centre-crop ratio it was evaluated with, its mean and std).
    """
    options = backbone_options()
    # Membership in the folder's listing, not a path built from the name: no separator or ".." gets anywhere.
    if name not in options:
        raise ModelLoadError(f"backbone={shorten(name)} is not an option of conf/backbone ({', '.join(options)})")
    path = CONFIG_DIR / "backbone" / f"{name}.yaml"
    backbone_cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    check_model_config(backbone_cfg, f"conf/backbone/{name}.yaml")
    backbone = instantiate(backbone_cfg)
    data = backbone.data_config
    image_size = int(data["input_size"][-1])
    model_config = {
        "backbone": backbone_cfg,
        "head": {"_target_": NORMALIZE_HEAD_TARGET, "_partial_": True, "in_features": int(backbone.num_features)},
        "image_size": image_size,
        "resize_size": round(image_size / float(data.get("crop_pct", 1.0))),
        "mean": [float(v) for v in data["mean"]],
        "std": [float(v) for v in data["std"]],
    }
    model = EmbeddingModel(backbone, instantiate(model_config["head"])())
    return TorchEmbedder(model, model_config, {"kind": "backbone", "path": name})


def load_embedder(
    ckpt: str | Path | None = None, model: str | Path | None = None, backbone: str | None = None
) -> Embedder:
    """The embedder named by exactly one of ``ckpt`` (Lightning checkpoint), ``model`` (.onnx) or ``backbone``.

    A ``.onnx`` file given as ``ckpt`` is accepted too, since users reasonably call any weights file that.

    Raises:
        ModelLoadError: none or several given, or the one given cannot be loaded.
    """
    given = [name for name, value in (("ckpt", ckpt), ("model", model), ("backbone", backbone)) if value]
    if len(given) != 1:
        raise ModelLoadError(f"give exactly one of ckpt=, model= (ONNX) or backbone=; got {given or 'none'}")
    if backbone:
        return load_backbone_embedder(str(backbone))
    path = Path(ckpt or model)
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path)
    if model:
        raise ModelLoadError(f"model={path} must be an .onnx file (use ckpt= for a Lightning checkpoint)")
    return load_checkpoint_embedder(path)


def load_embedder_from_source(source: dict[str, Any]) -> Embedder:
    """The embedder an index's metadata says it was built with (see :attr:`Embedder.source`).

    An index is data someone may hand over: a backbone it names must be one of the ``conf/backbone`` options
    (by name, never a path), and a checkpoint's model config may name only the project's model parts.
    """
    kind, path = source.get("kind"), source.get("path")
    if kind == "backbone":
        if path not in backbone_options():
            raise ModelLoadError(
                f"the index records the backbone {shorten(path)}, which is not an option of conf/backbone "
                f"({', '.join(backbone_options())}): the index is damaged or not to be trusted; rebuild it, or "
                "pass the model that built it with ckpt=, model= or backbone="
            )
        return load_backbone_embedder(path)
    if kind in ("checkpoint", "onnx"):
        if not Path(path).is_file():
            raise ModelLoadError(
                f"the {kind} this index was built with, {path}, is not there any more: pass ckpt= or model= "
                "with a model of the same weights (a checkpoint and its ONNX export are interchangeable)"
            )
        return OnnxEmbedder(path) if kind == "onnx" else load_checkpoint_embedder(path)
    raise ModelLoadError(f"the index records an unknown model source {shorten(source)}")
