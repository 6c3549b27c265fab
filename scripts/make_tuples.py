"""Draw a pairs or triplets file from a labelled dataset for `supervision=pairs | triplets`.

`python scripts/make_tuples.py kind=pairs count=2000 out=data/pairs.csv [seed=0] [holdout=0.2]` (and
`data=cub data.root=PATH` for another dataset) writes a CSV with paths relative to the data root and prints one
JSON line saying what it wrote.
"""

import sys

from metricsearch.cli.data import main_make_tuples

if __name__ == "__main__":
    sys.exit(main_make_tuples(sys.argv[1:]))
