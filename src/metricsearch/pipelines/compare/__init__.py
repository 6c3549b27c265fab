"""``make compare``: a fair loss comparison, the protocol of "A Metric Learning Reality Check" made practical.

Musgrave, Belongie and Lim (ECCV 2020) showed that most published gaps between losses vanish once every loss gets
the same tuning budget on validation data that never touches the test classes. Per dataset and loss:

1. **Search.** An Optuna study (TPE, seeded) of ``trials`` trials. A trial is one setting of the loss's own
   parameters (and its miner's; the space is ``conf/compare/<loss>.yaml``); everything else is shared by every loss
   (``conf/compare/protocol.yaml``). The training classes are split into K class-disjoint folds
   (``data.num_folds=K``); the trial trains K models, fold k validated on fold k (``data.fold=k``) with ``test=false``
   (the test classes are never evaluated), and its objective is the mean over folds of the validation MAP@R of the
   checkpoint each run selects (``metrics.json`` ``val_best``). ``prune=true`` stops a trial after its first fold
   when that fold is below the median of the others (Optuna's MedianPruner).
2. **Final runs.** The best setting (among the first ``trials`` finished trials, so every loss has the same budget
   even when parallel workers overshoot) trains again K folds x S seeds, now tested once on the test classes with
   ``save_test_embeddings=true``; the loss's default parameters get the same runs (the default-parameter baseline).
3. **Results** in ``<results_dir>`` (``results/compare/``): ``compare.md`` (per dataset, one table per metric: tuned
   separate mean ± 95% CI over the K x S models, tuned concatenated (the K fold models' embeddings concatenated per
   seed) ± CI over seeds, default separate ± CI, and the losses statistically indistinguishable from the best by
   Welch's t-test), ``trials.csv``, ``runs.csv``, ``summary.csv``, and per dataset ``intervals.png`` and each loss's
   ``search_history.png``.

Every run is one ``python train.py ...`` subprocess with its own run folder (through
:func:`metricsearch.pipelines.reproduce.run_cell`, as ``make reproduce``), so every number is traceable to a folder
holding its ``config.yaml`` and ``metrics.json``:

- search: ``<results_dir>/<dataset>/<loss>/search/<params key>/fold<k>``, the key a hash of the trial's parameters;
- final: ``<results_dir>/<dataset>/<loss>/final/{tuned-<params key>,default}/seed<s>/fold<k>``.

Resumable at every level: the studies live in an Optuna storage (``sqlite:///<results_dir>/optuna.db`` unless
``storage=`` names another database); a fold run whose folder has its ``metrics.json`` is skipped, one interrupted
mid-way continues from its ``last.ckpt``; a trial whose process died is failed and retried with the same parameters
(so its finished folds are reused): on this machine at once (its process is gone), elsewhere once its heartbeat
stops (Optuna's RDBStorage heartbeat and RetryFailedTrialCallback). Several processes or machines can work on one
study through one database URL; ``workers=N`` runs N trials at once here.

Its command line is :mod:`metricsearch.cli.compare`. The package, one module per step: :mod:`.space` (the search
spaces and the protocol's settings), :mod:`.folds` (one fold run), :mod:`.study` (the Optuna search),
:mod:`.finals` (the final runs), :mod:`.reports` (tables, CSVs and plots) and :mod:`.run` (the whole comparison).
"""

from __future__ import annotations

from metricsearch.pipelines.compare.folds import FoldRun, run_overrides
from metricsearch.pipelines.compare.reports import (
    Interval,
    LossSummary,
    format_compare_markdown,
    format_params,
    trial_rows,
)
from metricsearch.pipelines.compare.run import compare
from metricsearch.pipelines.compare.space import (
    SPACE_DIR,
    CompareError,
    available_losses,
    load_protocol,
    load_search_space,
    params_key,
    parse_search_space,
    sample_params,
)
from metricsearch.pipelines.compare.study import (
    best_trial,
    budget_trials,
    default_params,
    occupied_trials,
    open_storage,
    open_study,
    queue_default_trial,
    reclaim_dead_trials,
    worker_id,
)

__all__ = [
    "SPACE_DIR",
    "CompareError",
    "FoldRun",
    "Interval",
    "LossSummary",
    "available_losses",
    "best_trial",
    "budget_trials",
    "compare",
    "default_params",
    "format_compare_markdown",
    "format_params",
    "load_protocol",
    "load_search_space",
    "occupied_trials",
    "open_storage",
    "open_study",
    "params_key",
    "parse_search_space",
    "queue_default_trial",
    "reclaim_dead_trials",
    "run_overrides",
    "sample_params",
    "trial_rows",
    "worker_id",
]
