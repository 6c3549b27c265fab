"""Load-test the search server on loopback: N concurrent clients for a fixed time; requests, errors, p50/p99 latency.

python scripts/load_test.py index=INDEX_DIR [clients=16] [duration=20]    (--help lists the options)
"""

import sys

from metricsearch.cli.benchmarks import main_load_test

if __name__ == "__main__":
    sys.exit(main_load_test(sys.argv[1:]))
