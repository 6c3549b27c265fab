"""Errors of loading, running and exporting an embedding model: each message says what is wrong and what to do."""

from __future__ import annotations


class InferenceError(RuntimeError):
    """Base class of every error the model tools report to the user (a model that cannot load, embed or export)."""


class ModelLoadError(InferenceError):
    """A checkpoint or ONNX file cannot be turned into an embedder (wrong kind of file, weights that do not fit)."""
