"""The command lines of ``scripts/*.py``, one convention for all: ``key=value`` arguments, as ``train.py`` takes.

- :mod:`~metricsearch.cli.args`: the shared parser (``key=value``; ``--key value``, ``--key=value`` and ``--flag``
  read as the same keys), ``--help``, one-line errors;
- :mod:`~metricsearch.cli.search`: ``build_index.py``, ``search.py``, ``serve.py``, ``export.py``;
- :mod:`~metricsearch.cli.benchmarks`: ``benchmark.py``, ``bench_search.py``, ``load_test.py``;
- :mod:`~metricsearch.cli.data`: ``check_data.py``, ``prepare_data.py``;
- :mod:`~metricsearch.cli.reproduce`, :mod:`~metricsearch.cli.demo`: ``reproduce.py``, ``demo.py``.

They parse and report; the work is in :mod:`metricsearch.pipelines`, :mod:`metricsearch.search` and
:mod:`metricsearch.benchmarks`, imported only once the arguments are parsed, so ``--help`` never loads torch.
Nothing is imported here.
"""
