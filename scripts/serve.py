"""Serve the search page and its JSON API on 127.0.0.1.

python scripts/serve.py index=INDEX_DIR [port=8000]    (--help lists the options)
"""

import sys

from metricsearch.cli.search import main_serve

if __name__ == "__main__":
    sys.exit(main_serve(sys.argv[1:]))
