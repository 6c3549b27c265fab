"""Every benchmark of the project and the search server's load test, one module each.

- :mod:`~metricsearch.benchmarks.speed`: the speed-and-scale report (``make benchmark``,
  ``scripts/benchmark.py``): :func:`~metricsearch.benchmarks.speed.run_speed_benchmark` runs its sections and
  checks the targets;
- :mod:`~metricsearch.benchmarks.evaluation`: its ``eval`` section, our retrieval metrics against
  pytorch-metric-learning and torchmetrics, each method in a child process of its own, and its ``query_gallery``
  section, queries searched in a separate gallery at DeepFashion In-Shop size;
- :mod:`~metricsearch.benchmarks.training`: its ``overhead``, ``train`` and ``gpu_eval`` sections (Lightning's
  overhead, training images/s per data path, the whole SOP-size evaluation on a GPU);
- :mod:`~metricsearch.benchmarks.report`: the speed report as JSON and markdown, one function per section;
- :mod:`~metricsearch.benchmarks.search`: exact vs IVF vs HNSW faiss indexes (``make bench-search``):
  :func:`~metricsearch.benchmarks.search.run_search_benchmark`;
- :mod:`~metricsearch.benchmarks.load_test`: concurrent clients against the search server (``make load-test``):
  :func:`~metricsearch.benchmarks.load_test.run_load_test`.

Nothing is imported here, so that ``scripts/*.py --help`` answers without loading torch or faiss.
"""

# The sections of the speed benchmark, in the order they run; here, not in speed.py, so that the command line can
# list them without loading torch.
SECTIONS = ("eval", "query_gallery", "overhead", "train", "gpu_eval")
