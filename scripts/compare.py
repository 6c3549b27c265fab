"""Fair loss comparison: equal tuning budget per loss, class-disjoint cross-validation, 95% CIs (`make compare`).

python scripts/compare.py                                   # built-in data, the losses of conf/compare/protocol.yaml
python scripts/compare.py losses=triplet,proxy_anchor trials=20 folds=4 seeds=0,1,2 epochs=6
python scripts/compare.py datasets=cub extra="paths.data_dir=/data logger=wandb"   # Reality Check settings
python scripts/compare.py workers=2 storage=postgresql://host/db   # share the studies with other machines
python scripts/compare.py aggregate_only=true               # rewrite results/compare/ from the studies and runs
(--trials 20 --dry-run ... mean the same; --help lists the options)
"""

import sys

from metricsearch.cli.compare import main_compare

if __name__ == "__main__":
    sys.exit(main_compare(sys.argv[1:]))
