"""Inference: a trained (or pretrained) embedding model turned into embeddings.

Modules, in the order data flows through them:

- :mod:`~metricsearch.inference.model_choice`: the ``ckpt=`` / ``model=`` / ``backbone=`` choice of a model, one
  definition for every function and command that takes one;
- :mod:`~metricsearch.inference.model_loading`: loading the model (an ``Embedder``) from a checkpoint, an ONNX export
  or a pretrained backbone, with its preprocessing and weight fingerprint;
- :mod:`~metricsearch.inference.predict_embeddings`: embedding image files through ``lightning.Trainer.predict``
  (DDP-ready, sharded across ranks);
- :mod:`~metricsearch.inference.export`: the ONNX export of a checkpoint and its parity check;
- :mod:`~metricsearch.inference.errors`: what they report to the user.

Evaluation, export, the benchmarks and :mod:`metricsearch.search` (the index and the server) use them.

Nothing is imported here, so that ``scripts/*.py --help`` answers without loading torch.
"""
