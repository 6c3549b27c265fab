"""Check a dataset copy: `python scripts/check_data.py data=cub data.root=PATH [--verify] [--strict]`.

Prints one JSON line (train_images, test_images, train_classes, test_classes, the expected counts of the complete
dataset, the layout found) and exits 0, or prints one line naming what is broken and exits 1.
"""

import sys

from metricsearch.pipelines.data_tools import check_data

if __name__ == "__main__":
    sys.exit(check_data(sys.argv[1:]))
