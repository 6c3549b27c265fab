"""Export workflow behind ``scripts/export.py``: a checkpoint's (or a pretrained backbone's) model to ONNX, checked.

The exported file and its metadata are described in :mod:`metricsearch.inference.export`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

import torch

from metricsearch.inference.errors import InferenceError, ModelLoadError
from metricsearch.inference.export import DEFAULT_OPSET, check_parity, export_onnx
from metricsearch.inference.model_choice import ModelChoice
from metricsearch.inference.model_loading import OnnxEmbedder, TorchEmbedder, load_embedder

# Largest |onnxruntime - PyTorch| difference an export may show on a random batch.
MAX_PARITY_DIFFERENCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    """What was exported where, and how far onnxruntime was from PyTorch (None when not checked)."""

    path: Path
    model: str
    max_difference: float | None


def default_export_path(ckpt: str | Path | None, backbone: str | None) -> Path:
    """Beside the checkpoint (``.onnx`` instead of ``.ckpt``), or ``outputs/export/<backbone>.onnx``."""
    return Path(ckpt).with_suffix(".onnx") if ckpt else Path("outputs") / "export" / f"{backbone}.onnx"


def export_model(
    out: str | Path | None = None, opset: int = DEFAULT_OPSET, check: bool = True, **choice: Unpack[ModelChoice]
) -> ExportResult:
    """Exports the PyTorch model ``choice`` names (``ckpt=`` or ``backbone=``) to ONNX.

    Args:
        out: the file to write; by default :func:`default_export_path`.
        opset: the ONNX opset.
        check: compare onnxruntime with PyTorch on a random batch of 4 images after exporting.
        choice: the model (:mod:`metricsearch.inference.model_choice`).

    Raises:
        InferenceError: the model cannot be loaded or is not a PyTorch model, or the export differs from it by more
            than :data:`MAX_PARITY_DIFFERENCE`.
    """
    embedder = load_embedder(**choice)
    if not isinstance(embedder, TorchEmbedder):
        raise ModelLoadError(f"{embedder.describe()} is already ONNX: export a checkpoint (ckpt=) or backbone=")
    path = export_onnx(embedder, out or default_export_path(choice.get("ckpt"), choice.get("backbone")), opset=opset)
    difference = None
    if check:
        size = embedder.preprocessing["image_size"]
        images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        difference = check_parity(embedder, OnnxEmbedder(path), images)
        if difference > MAX_PARITY_DIFFERENCE:
            raise InferenceError(
                f"the ONNX model written to {path} differs from PyTorch by {difference:.2e} "
                f"(> {MAX_PARITY_DIFFERENCE:g}) on a random batch"
            )
    return ExportResult(path, embedder.describe(), difference)
