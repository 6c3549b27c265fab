"""Errors of the search tools: each message says what is wrong and what to do about it."""

from __future__ import annotations


class SearchError(RuntimeError):
    """Base class of every error the search tools report to the user (CLI and web page)."""


class ModelLoadError(SearchError):
    """A checkpoint or ONNX file cannot be turned into an embedder (wrong kind of file, weights that do not fit)."""


class IndexMismatchError(SearchError):
    """An index was built by another model, or with another embedding size, than the one asked to search it."""


class IndexLoadError(SearchError):
    """An index folder is missing, unfinished or inconsistent."""
