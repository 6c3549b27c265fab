"""Errors of the search tools: each message says what is wrong and what to do about it."""

from __future__ import annotations

from metricsearch.utils.messages import shorten

# Most results one search may ask for, from the command line and from the server alike.
MAX_K = 100
# Candidates a re-ranking search (postprocess=dba or k_reciprocal) re-ranks per query, by default and at most.
DEFAULT_SHORTLIST = 100
MAX_SHORTLIST = 2000


class SearchError(RuntimeError):
    """Base class of every error the search tools report to the user (CLI and web page)."""


class IndexMismatchError(SearchError):
    """An index was built by another model, or with another embedding size, than the one asked to search it."""


class IndexLoadError(SearchError):
    """An index folder is missing, unfinished, inconsistent, or names something it must not."""


class RequestError(SearchError):
    """A search asks for something out of bounds (e.g. ``k``); the CLI and the server refuse it alike."""


def check_k(k: int, max_k: int = MAX_K) -> int:
    """``k`` if it is a number of results a search may ask for (1 to ``max_k``): the one rule of every tool.

    Raises:
        RequestError: ``k`` is not an integer from 1 to ``max_k``; the message is the same from the command line
            and from the server.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise RequestError(f"k must be between 1 and {max_k}, got {shorten(k, 20)}")
    return k
