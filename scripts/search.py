"""Query an index by example, print the ranked results and write a PNG grid.

python scripts/search.py index=INDEX_DIR query=IMG k=10 [--json]    (--help lists the options)
"""

import sys

from metricsearch.cli.search import main_search

if __name__ == "__main__":
    sys.exit(main_search(sys.argv[1:]))
