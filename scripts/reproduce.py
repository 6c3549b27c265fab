"""Run the loss x dataset x seed grid and write results/ (what `make reproduce` calls).

python scripts/reproduce.py                                   # synthetic x 7 losses x 3 seeds
python scripts/reproduce.py --datasets synthetic,cub,cars196,sop --seeds 0,1 --extra "backbone=resnet50"
python scripts/reproduce.py --aggregate-only                  # rewrite the tables from finished cells
"""

import sys

from metricsearch.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
