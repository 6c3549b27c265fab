"""Measure a model on a labelled image folder: print its retrieval metrics and write metrics.json and pictures.

python scripts/evaluate.py ckpt=PATH data=folder data.root=DIR       (or backbone=NAME instead of ckpt=)
(--help lists the options)
"""

import sys

from metricsearch.cli.evaluate import main_evaluate

if __name__ == "__main__":
    sys.exit(main_evaluate(sys.argv[1:]))
