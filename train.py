"""Train an embedding model: `python train.py loss=triplet` (see conf/train.yaml for every option)."""

import sys

import hydra
from omegaconf import DictConfig

from metricsearch.utils.config import normalize_overrides


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from metricsearch.pipelines.train import train

    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    main()
