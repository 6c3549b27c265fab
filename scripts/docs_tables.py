"""Write the results tables of README.md and docs/ from results/: `python scripts/docs_tables.py [check=true]`.

`make docs` runs it before building the site; `check=true` writes nothing and exits 1 when a page is stale.
"""

import sys

from metricsearch.cli.docs import main_docs_tables

if __name__ == "__main__":
    sys.exit(main_docs_tables(sys.argv[1:]))
