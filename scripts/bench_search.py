"""Benchmark faiss exact / IVF / HNSW and Milvus Lite search on a 100k synthetic gallery.

python scripts/bench_search.py [n=100000]    (--help lists the options)
"""

import sys

from metricsearch.cli.benchmarks import main_bench_search

if __name__ == "__main__":
    sys.exit(main_bench_search(sys.argv[1:]))
