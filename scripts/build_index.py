"""Embed a gallery folder and save a faiss index.

python scripts/build_index.py ckpt=PATH gallery=DIR out=INDEX_DIR    (--help lists the options)
"""

import sys

from metricsearch.cli.search import main_build_index

if __name__ == "__main__":
    sys.exit(main_build_index(sys.argv[1:]))
