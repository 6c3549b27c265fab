"""Image search with a trained (or pretrained) embedding model.

Modules, in the order data flows through them:

- :mod:`~metricsearch.search.embedder`: a model from a checkpoint, an ONNX export or a pretrained backbone,
  with its preprocessing and weight fingerprint;
- :mod:`~metricsearch.search.embedding`: embedding a gallery through ``lightning.Trainer.predict`` (DDP-ready);
- :mod:`~metricsearch.search.index`: the faiss index on disk (exact, IVF, HNSW), written atomically;
- :mod:`~metricsearch.search.pipeline`: build, add to, open and query an index;
- :mod:`~metricsearch.search.grid`, :mod:`~metricsearch.search.server`, :mod:`~metricsearch.search.export`,
  :mod:`~metricsearch.search.demo`: the picture, the web page, ONNX and ``make demo``;
  :mod:`~metricsearch.search.cli` holds the scripts' command lines (the search benchmark and the load test live in
  :mod:`metricsearch.benchmarks`).

Nothing is imported here, so that ``scripts/*.py --help`` answers without loading torch or faiss.
"""
