"""What `make demo` runs: train or reuse, index, search, write outputs/demo/search_grid.png.

python scripts/demo.py [out=outputs/demo]    (--help lists the options)
"""

import sys

from metricsearch.cli.demo import main_demo

if __name__ == "__main__":
    sys.exit(main_demo(sys.argv[1:]))
