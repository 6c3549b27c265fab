"""ONNX export of an embedder, with its preprocessing and fingerprint stored in the file's metadata.

The exported graph maps a batch of preprocessed images ``[batch, 3, H, W]`` (the batch axis is dynamic) to
L2-normalised embeddings ``[batch, D]``. The metadata makes the file self-describing: an
:class:`~metricsearch.inference.model_loading.OnnxEmbedder` preprocesses queries exactly as the checkpoint did, and
carries the checkpoint's weight fingerprint, so an index built with either is searchable with the other.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from metricsearch.inference.errors import InferenceError
from metricsearch.inference.model_loading import (
    ONNX_EMBEDDING_DIM,
    ONNX_FINGERPRINT,
    ONNX_MODEL_CONFIG,
    ONNX_SOURCE,
    OnnxEmbedder,
    TorchEmbedder,
)
from metricsearch.utils.atomic_io import atomic_path

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
DEFAULT_OPSET = 17


def export_onnx(embedder: TorchEmbedder, out_path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Writes ``embedder``'s network as an ONNX file (atomically) and returns its path.

    Args:
        embedder: a PyTorch embedder (checkpoint or pretrained backbone).
        out_path: the ``.onnx`` file to write.
        opset: ONNX opset version; 17 is supported by every current onnxruntime.
    """
    out_path = Path(out_path).expanduser().resolve()
    if out_path.suffix.lower() != ".onnx":
        raise InferenceError(f"out={out_path} must end in .onnx")
    model = embedder.model.eval().cpu()
    size = embedder.preprocessing["image_size"]
    example = torch.zeros(2, 3, size, size)
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        # NOTE: the TorchScript-based exporter; the newer torch.export-based one needs onnxscript, which the
        # pinned environment does not have. Its deprecation warning is expected.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        metadata = {
            ONNX_MODEL_CONFIG: json.dumps(embedder.model_config),
            ONNX_FINGERPRINT: embedder.fingerprint,
            ONNX_EMBEDDING_DIM: str(embedder.embedding_dim),
            ONNX_SOURCE: json.dumps(embedder.source),
        }
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "metricsearch"
        tmp.write_bytes(proto.SerializeToString())
    log.info("Exported %s to %s", embedder.describe(), out_path)
    return out_path


def check_parity(torch_embedder: TorchEmbedder, onnx_embedder: OnnxEmbedder, images: torch.Tensor) -> float:
    """Largest absolute difference between the two embedders' outputs on a batch of preprocessed images."""
    expected = torch_embedder.embed_tensor(images).numpy()
    actual = onnx_embedder.embed_tensor(images).numpy()
    return float(np.abs(expected - actual).max())
