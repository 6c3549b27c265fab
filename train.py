"""Train an embedding model: `python train.py loss=triplet` (see conf/train.yaml for every option)."""

import sys

import hydra
from omegaconf import DictConfig

from metricsearch.utils.config import USER_ERROR_EXIT, ConfigError, normalize_overrides, report_user_errors


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from metricsearch.pipelines.run_config import resolve_run_config

    # Checked and resolved once, before torch is even imported: a mistyped setting fails in a second, as one line.
    with report_user_errors(ConfigError):
        run = resolve_run_config(cfg)
    from metricsearch.pipelines.train import USER_ERRORS, train

    with report_user_errors(*USER_ERRORS):
        metrics = train(run)
    return metrics.get(run.cfg.get("optimized_metric"))


if __name__ == "__main__":
    try:  # an option that is a path or not an option at all: one line, before Hydra reads a file
        sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    main()
