"""Measure query expansion, database-side augmentation and k-reciprocal re-ranking by the exact metrics.

python scripts/bench_postprocess.py embeddings=RUN/test_embeddings.npz    (--help lists the options)
"""

import sys

from metricsearch.cli.benchmarks import main_bench_postprocess

if __name__ == "__main__":
    sys.exit(main_bench_postprocess(sys.argv[1:]))
