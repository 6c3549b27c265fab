"""Download, verify and unpack a dataset: `python scripts/prepare_data.py data=cub [data.root=PATH] [info=true]`.

With internet: fetches the archives from their known sources, checks their MD5 and unpacks them into the data
root, then checks the layout and counts. Without: prints where each archive can be obtained and the layout
expected.
"""

import sys

from metricsearch.cli.data import main_prepare_data

if __name__ == "__main__":
    sys.exit(main_prepare_data(sys.argv[1:]))
