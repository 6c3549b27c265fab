"""Export the embedding model to ONNX.

python scripts/export.py ckpt=PATH format=onnx    (--help lists the options)
"""

import sys

from metricsearch.cli.search import main_export

if __name__ == "__main__":
    sys.exit(main_export(sys.argv[1:]))
