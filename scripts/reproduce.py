"""Run the loss x dataset x seed grid and write results/ (what `make reproduce` calls).

python scripts/reproduce.py                                   # synthetic x 7 losses x 3 seeds
python scripts/reproduce.py datasets=synthetic,cub,cars196,sop seeds=0,1 extra="backbone=resnet50"
python scripts/reproduce.py aggregate_only=true               # rewrite the tables from finished cells
(--datasets A,B --seeds 0,1 --aggregate-only ... mean the same; --help lists the options)
"""

import sys

from metricsearch.cli.reproduce import main_reproduce

if __name__ == "__main__":
    sys.exit(main_reproduce(sys.argv[1:]))
