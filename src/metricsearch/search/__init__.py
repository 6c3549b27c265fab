"""Image search with a trained (or pretrained) embedding model.

Modules, in the order data flows through them:

- :mod:`~metricsearch.search.gallery`: the image files of a gallery folder and their labels;
- :mod:`~metricsearch.search.index`: the faiss index on disk (exact, IVF, HNSW), written atomically, and
  ``open_index`` (an index with a model checked to be the one that built it);
- :mod:`~metricsearch.search.milvus_index`, :mod:`~metricsearch.search.backends`: the Milvus backend, and opening
  an index of either backend; :mod:`~metricsearch.search.filters`: filtered search;
- :mod:`~metricsearch.search.rerank`: re-ranking and query expansion of a search (``postprocess=``);
- :mod:`~metricsearch.search.grid`, :mod:`~metricsearch.search.server`, :mod:`~metricsearch.search.page`: the
  picture of a result, the web service and its page;
- :mod:`~metricsearch.search.errors`: what they report to the user.

The model that embeds the gallery and the queries (choosing it, loading it, predicting embeddings, exporting it to
ONNX) is :mod:`metricsearch.inference`.

The workflows that use them (build an index, add to it, query it; ``make demo``) are in
:mod:`metricsearch.pipelines`, the scripts' command lines in :mod:`metricsearch.cli`, the search benchmark and the
load test in :mod:`metricsearch.benchmarks`.

Nothing is imported here, so that ``scripts/*.py --help`` answers without loading torch or faiss.
"""
