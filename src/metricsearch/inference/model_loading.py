"""Loading a model for search: an :class:`Embedder` from a checkpoint, an ONNX file or a pretrained backbone.

An embedder takes images in and gives L2-normalised embeddings out. The network itself and its config come from
:mod:`metricsearch.models` (:func:`~metricsearch.models.embedding_model.build_embedding_model`,
:class:`~metricsearch.models.model_config.ModelConfig`, whose checks keep a handed-over file from naming anything
but the project's own model parts).

Every way of building or searching an index goes through an :class:`Embedder`, which carries three things
besides the network: the preprocessing the network was trained with (so a query is resized and normalised
exactly like the gallery), the embedding size, and a *fingerprint* of the weights. The fingerprint is a
SHA-256 over every tensor of the embedding network and the preprocessing; it is what an index records and
checks, so an index is never searched with embeddings of another model. It does not depend on the file the
weights came from: a checkpoint and its ONNX export (which stores the fingerprint in its metadata) agree.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from metricsearch.data.transforms import build_eval_transform
from metricsearch.inference.errors import ModelLoadError
from metricsearch.inference.model_choice import ModelChoice, given_choice
from metricsearch.models.embedding_model import EmbeddingModel, build_embedding_model
from metricsearch.models.model_config import (
    NORMALIZE_HEAD_TARGET,
    ModelConfig,
    ModelConfigError,
    check_model_config,
    preprocessing_of,
)
from metricsearch.utils.checkpoint_io import unreadable_checkpoint_reason
from metricsearch.utils.config import CONFIG_DIR
from metricsearch.utils.messages import shorten

# Keys of the metadata an ONNX export carries (ONNX metadata values are strings).
ONNX_MODEL_CONFIG = "metricsearch.model_config"
ONNX_FINGERPRINT = "metricsearch.fingerprint"
ONNX_EMBEDDING_DIM = "metricsearch.embedding_dim"
ONNX_SOURCE = "metricsearch.source"


def _load_error(err: ModelConfigError) -> ModelLoadError:
    """A model config's problem as the search tools report it (one line, the same message)."""
    return ModelLoadError(str(err))


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
            :class:`~metricsearch.models.model_config.ModelConfig`); what an index and an ONNX export record.
        fingerprint: hex SHA-256 of the weights and preprocessing (see :func:`fingerprint_weights`).
        source: where the model came from, as recorded in an index: ``kind`` (checkpoint, onnx, backbone),
            ``path`` (a file, or a backbone name) and, for files, the file's ``sha256``.
    """

    def __init__(self, model_config: dict[str, Any], fingerprint: str, source: dict[str, Any]) -> None:
        self.model_config = model_config
        self.fingerprint = fingerprint
        self.source = source
        try:
            self.preprocessing = preprocessing_of(model_config)
        except ModelConfigError as err:
            raise _load_error(err) from err
        self.transform: Callable[[Image.Image], torch.Tensor] = build_eval_transform(**self.preprocessing)

    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """Size of the embeddings."""

    @abstractmethod
    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (float32, on the CPU) of a batch of preprocessed images ``[B, 3, H, W]``."""

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The network's input ``[len(images), 3, H, W]``: each RGB image resized, cropped, put in the network's channel
        order and normalised."""
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
        config: how to rebuild ``model`` and preprocess its inputs.
        source: where the weights came from (see :class:`Embedder`).
    """

    def __init__(self, model: EmbeddingModel, config: ModelConfig, source: dict[str, Any]) -> None:
        self.model = model.eval()
        super().__init__(config.to_dict(), fingerprint_weights(model.state_dict(), config.preprocessing), source)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.head.embedding_dim)

    def embed_tensor(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            return self.model(images.to(device)).float().cpu()


class OnnxEmbedder(Embedder):
    """An ONNX export (see :mod:`metricsearch.inference.export`) run by onnxruntime on the CPU.

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


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"ckpt={path} does not exist")
    try:
        # weights_only: a checkpoint is data; never run code from a file someone handed us.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is no checkpoint
        raise ModelLoadError(
            f"ckpt={path} cannot be read: {unreadable_checkpoint_reason(path, err)}; pass a checkpoint that training "
            "wrote (a run's checkpoints/*.ckpt)"
        ) from err


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
    try:
        config = ModelConfig.from_dict(model_config, f"ckpt={path}")
    except ModelConfigError as err:
        raise _load_error(err) from err
    # The checkpoint's own weights replace whatever the backbone starts with: never download or read others for it
    # (training already records pretrained=false; a checkpoint from elsewhere might not).
    no_weights = {
        key: value for key, value in {"pretrained": False, "weights_file": None}.items() if key in config.backbone
    }
    model = build_embedding_model({**config.backbone, **no_weights}, config.head)
    name = f"{config.backbone.get('model_name', config.backbone.get('_target_'))}"
    name += f" -> {config.head.get('embedding_dim', '?')}-d head"
    _check_state_dict_fits(model, state, path, name)
    model.load_state_dict(state, strict=True)
    return TorchEmbedder(model, config, {"kind": "checkpoint", "path": str(path), "sha256": file_sha256(path)})


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
    try:
        check_model_config(backbone_cfg, f"conf/backbone/{name}.yaml")
    except ModelConfigError as err:
        raise _load_error(err) from err
    head_cfg = {"_target_": NORMALIZE_HEAD_TARGET, "_partial_": True}
    model = build_embedding_model(backbone_cfg, head_cfg)
    data = model.backbone.data_config
    image_size = int(data["input_size"][-1])
    resize_size = round(image_size / float(data.get("crop_pct", 1.0)))
    config = ModelConfig.describe(model, backbone_cfg, head_cfg, image_size, resize_size)
    return TorchEmbedder(model, config, {"kind": "backbone", "path": name})


def load_embedder(**choice: Unpack[ModelChoice]) -> Embedder:
    """The embedder named by exactly one of ``ckpt`` (Lightning checkpoint), ``model`` (.onnx) or ``backbone``.

    A ``.onnx`` file given as ``ckpt`` is accepted too, since users reasonably call any weights file that.

    Raises:
        ModelLoadError: none or several given, or the one given cannot be loaded.
    """
    given = given_choice(choice)
    if len(given) != 1:
        raise ModelLoadError(f"give exactly one of ckpt=, model= (ONNX) or backbone=; got {list(given) or 'none'}")
    if "backbone" in given:
        return load_backbone_embedder(str(given["backbone"]))
    path = Path(given.get("ckpt") or given["model"])
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path)
    if "model" in given:
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
