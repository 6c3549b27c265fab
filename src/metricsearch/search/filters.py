"""Search filters: restrict results to one class or one folder of the gallery.

A filter's values come from users (a command-line option, a form field of the API). They are validated here
once, and each backend turns a validated filter into its own terms: the faiss index into a mask over its rows
(an exact post-filter), Milvus into a boolean expression in which every value is a quoted, escaped string
literal (:func:`milvus_expression`): user text is never pasted into an expression as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from metricsearch.search.errors import RequestError
from metricsearch.utils.messages import shorten

# Longest class name or folder a filter accepts (the gallery paths themselves are bounded by PATH_MAX).
MAX_FILTER_CHARS = 1024


@dataclass(frozen=True)
class SearchFilter:
    """Which gallery images a search may return; both given: images that satisfy both.

    Attributes:
        label: only images of this class.
        folder: only images under this folder of the gallery (relative, POSIX separators; subfolders included).
    """

    label: str | None = None
    folder: str | None = None

    def __post_init__(self) -> None:
        if self.label is not None:
            _check_text("label", self.label)
        if self.folder is not None:
            _check_text("folder", self.folder)
            parts = self.folder.strip("/").split("/")
            if self.folder.startswith("/") or "\\" in self.folder or any(p in ("", ".", "..") for p in parts):
                raise RequestError(
                    f"folder={shorten(self.folder)} should be a folder of the gallery, relative to its root "
                    "(e.g. shoes/red), without '..', '.' or backslashes"
                )
            object.__setattr__(self, "folder", "/".join(parts))

    @classmethod
    def of(cls, label: str | None = None, folder: str | None = None) -> SearchFilter | None:
        """The filter of these values, or None when neither is given (empty strings count as not given)."""
        label, folder = label or None, folder or None
        return None if label is None and folder is None else cls(label, folder)

    def matches(self, path: str, label: str | None) -> bool:
        """Whether the gallery image ``path`` of class ``label`` passes the filter."""
        if self.label is not None and label != self.label:
            return False
        return self.folder is None or path.startswith(self.folder + "/")


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_FILTER_CHARS:
        raise RequestError(f"{name} should be a non-empty text of at most {MAX_FILTER_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise RequestError(f"{name}={shorten(value)} contains control characters")


def folders_of(path: str) -> list[str]:
    """Every folder ``path`` lies under, outermost first: ``a/b/c.jpg`` -> ``["a", "a/b"]``."""
    parents = PurePosixPath(path).parents
    return [p.as_posix() for p in reversed(parents) if p.as_posix() != "."]


def quote_literal(value: str) -> str:
    """``value`` as a Milvus string literal: double quotes, with backslashes and double quotes escaped.

    Milvus's expression grammar reads ``\\\\`` and ``\\"`` inside a double-quoted string as a backslash and a
    quote; a validated value has no control characters, so no other escape can occur.
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def milvus_expression(where: SearchFilter) -> str:
    """The Milvus boolean expression of a filter (fields ``label`` and ``folders``, see the Milvus index)."""
    terms = []
    if where.label is not None:
        terms.append(f"label == {quote_literal(where.label)}")
    if where.folder is not None:
        terms.append(f"ARRAY_CONTAINS(folders, {quote_literal(where.folder)})")
    return " and ".join(terms)
