"""Check a dataset copy: `python scripts/check_data.py data=cub data.root=PATH [verify=true] [strict=true]`.

Prints one JSON line (train_images, test_images, train_classes, test_classes; for a query/gallery dataset such as
In-Shop train_images, query_images, gallery_images, train_classes, test_classes; the protocol, the expected counts
of the complete dataset, the layout found) and exits 0, or prints one line naming what is broken and exits 1.
"""

import sys

from metricsearch.cli.data import main_check_data

if __name__ == "__main__":
    sys.exit(main_check_data(sys.argv[1:]))
