"""Re-ranking and query expansion in a search: the evaluation's methods applied to one query's shortlist.

The evaluation post-processes a whole test set at once (:mod:`metricsearch.metrics.postprocess`); a search has one
query and an index that may hold millions of images. So each method here works on what the index returns for the
query, with the stored vectors of those images, and calls the evaluation's own functions on it:

- ``aqe``: the query is expanded from its ``k`` nearest gallery images (:func:`expand_queries`), then the whole
  index is searched again with the expanded query. Exact whenever the index is (the ``k`` nearest of the index
  are the ``k`` nearest of the gallery); the scores are similarities to the expanded query.
- ``dba``: the shortlist's vectors are augmented by their nearest neighbours *within the shortlist*
  (:func:`augment_database`) and the shortlist is re-ranked by the query's similarity to them.
- ``k_reciprocal``: the k-reciprocal distances of the query and the shortlist (:func:`k_reciprocal_scores`), over
  the joint set of the query and the shortlist, re-rank the shortlist; the scores are the negated final distances.

The shortlist is the top ``max(k, shortlist)`` of the index (``postprocess.shortlist``, 100 by default). When it
holds the whole gallery, a search ranks as the evaluation's implementation ranks that gallery for that query alone
(tested on both backends); docs/postprocess.md says what the shortlist changes otherwise. A filter (class, folder)
applies before anything else: the methods see only the images that pass it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metricsearch.metrics.postprocess import (
    POSTPROCESS_METHODS,
    KReciprocalParams,
    PostprocessSettings,
    augment_database,
    expand_queries,
    k_reciprocal_scores,
)
from metricsearch.search.backends import AnyIndex
from metricsearch.search.errors import DEFAULT_SHORTLIST, MAX_SHORTLIST, RequestError
from metricsearch.search.filters import SearchFilter
from metricsearch.search.index import Hit
from metricsearch.utils.messages import shorten


@dataclass(frozen=True)
class SearchPostprocess:
    """The post-processing of a search: a method, its parameters and the shortlist it re-ranks.

    Attributes:
        settings: the method and its parameters, with the evaluation's defaults (``conf/postprocess``).
        shortlist: candidates re-ranked per query by ``dba`` and ``k_reciprocal`` (at least ``k`` are).
    """

    settings: PostprocessSettings = field(default_factory=PostprocessSettings)
    shortlist: int = DEFAULT_SHORTLIST

    def __post_init__(self) -> None:
        if isinstance(self.shortlist, bool) or not isinstance(self.shortlist, int):
            raise RequestError(f"postprocess.shortlist must be an integer, got {shorten(self.shortlist, 20)}")
        # Each bounds the work of one query (neighbour searches and the k-reciprocal sets are over the shortlist).
        for name, value in (("shortlist", self.shortlist), ("k", self.settings.k), ("k1", self.settings.k1)):
            if not 1 <= value <= MAX_SHORTLIST:
                raise RequestError(f"postprocess.{name} must be between 1 and {MAX_SHORTLIST}, got {value}")
        if self.settings.k2 > MAX_SHORTLIST:
            raise RequestError(f"postprocess.k2 must be at most {MAX_SHORTLIST}, got {self.settings.k2}")

    @classmethod
    def of(
        cls, method: str = "none", params: dict[str, Any] | None = None, shortlist: int | None = None
    ) -> SearchPostprocess:
        """From option values: ``params`` as the ``postprocess`` config names them (``k``, ``alpha``, ``k1``,
        ``k2``, ``lambda``); those left out take the evaluation's defaults.

        Raises:
            RequestError: an unknown method or parameter, or a value out of its range.
        """
        check_method(method)
        try:
            settings = PostprocessSettings.from_mapping({"method": method, **(params or {})})
        except (TypeError, ValueError) as err:
            raise RequestError(str(err)) from None
        return cls(settings, DEFAULT_SHORTLIST if shortlist is None else shortlist)

    @property
    def method(self) -> str:
        return self.settings.method

    def with_method(self, method: str | None) -> SearchPostprocess:
        """The same parameters with another method (None: this one), as a request may ask.

        Raises:
            RequestError: ``method`` is not one of :data:`POSTPROCESS_METHODS`.
        """
        if method is None:
            return self
        check_method(method)
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, method=method))

    def describe(self) -> dict[str, Any]:
        """The method and the parameters it uses, for a search's answer."""
        s = self.settings
        used = {
            "none": {},
            "aqe": {"k": s.k, "alpha": s.alpha},
            "dba": {"k": s.k, "alpha": s.alpha, "shortlist": self.shortlist},
            "k_reciprocal": {"k1": s.k1, "k2": s.k2, "lambda": s.lambda_value, "shortlist": self.shortlist},
        }[s.method]
        return {"method": s.method, **used}


def check_method(method: Any) -> str:
    """``method`` if it is a post-processing method's name.

    Raises:
        RequestError: it is not one of :data:`POSTPROCESS_METHODS` (the message never echoes it whole).
    """
    if method not in POSTPROCESS_METHODS:
        raise RequestError(f"postprocess={shorten(method, 40)} is not one of {', '.join(POSTPROCESS_METHODS)}")
    return method


def search_postprocessed(
    index: AnyIndex,
    queries: np.ndarray,
    k: int,
    where: SearchFilter | None = None,
    post: SearchPostprocess | None = None,
) -> list[list[Hit]]:
    """The top ``k`` of each query after ``post``'s method (see the module docstring); ``none``: a plain search."""
    post = post or SearchPostprocess()
    settings = post.settings
    if settings.method == "none":
        return index.search(queries, k, where)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if settings.method == "aqe":
        return _expanded_search(index, queries, k, where, settings)
    results = []
    for query, (hits, vectors) in zip(queries, index.shortlist(queries, max(k, post.shortlist), where), strict=True):
        if not hits:
            results.append([])
            continue
        if settings.method == "dba":
            scores = augment_database(vectors, settings.k, settings.alpha) @ query
        else:
            params = KReciprocalParams(settings.k1, settings.k2, settings.lambda_value)
            ((_, block),) = k_reciprocal_scores(query[None], vectors, params)
            scores = block[0]
        order = np.argsort(-scores, kind="stable")[:k]
        results.append(
            [dataclasses.replace(hits[i], rank=rank + 1, score=float(scores[i])) for rank, i in enumerate(order)]
        )
    return results


def _expanded_search(
    index: AnyIndex, queries: np.ndarray, k: int, where: SearchFilter | None, settings: PostprocessSettings
) -> list[list[Hit]]:
    """alpha-QE: each query expanded from its ``settings.k`` nearest images, then searched for again."""
    neighbours = index.shortlist(queries, settings.k, where)
    found = [i for i, (hits, _) in enumerate(neighbours) if hits]
    results: list[list[Hit]] = [[] for _ in queries]
    if not found:
        return results
    expanded = np.concatenate(
        [expand_queries(queries[i][None], neighbours[i][1], settings.k, settings.alpha) for i in found]
    )
    for i, hits in zip(found, index.search(expanded, k, where), strict=True):
        results[i] = hits
    return results
