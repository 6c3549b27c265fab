"""Image search with a trained (or pretrained) embedding model.

Modules, in the order data flows through them:

- :mod:`~metricsearch.search.gallery`: the image files of a gallery folder and their labels;
- :mod:`~metricsearch.search.model_choice`: the ``ckpt=`` / ``model=`` / ``backbone=`` choice of that model, one
  definition for every function and command that takes one;
- :mod:`~metricsearch.search.model_loading`: loading the model to search with (an ``Embedder``) from a checkpoint,
  an ONNX export or a pretrained backbone, with its preprocessing and weight fingerprint;
- :mod:`~metricsearch.search.predict_embeddings`: embedding a gallery's files through ``lightning.Trainer.predict``
  (DDP-ready, sharded across ranks);
- :mod:`~metricsearch.search.index`: the faiss index on disk (exact, IVF, HNSW), written atomically, and
  ``open_index`` (an index with a model checked to be the one that built it);
- :mod:`~metricsearch.search.grid`, :mod:`~metricsearch.search.server`, :mod:`~metricsearch.search.export`: the
  picture, the web page, ONNX.

The workflows that use them (build an index, add to it, query it; ``make demo``) are in
:mod:`metricsearch.pipelines`, the scripts' command lines in :mod:`metricsearch.cli`, the search benchmark and the
load test in :mod:`metricsearch.benchmarks`.

Nothing is imported here, so that ``scripts/*.py --help`` answers without loading torch or faiss.
"""
