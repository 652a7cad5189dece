"""python -m evaluation task=<passkey|passkey_grid|passkey_1m|pg19|perplexity_local|booksum|booksum_chapter|
booksum_paper|booksum_beam|memory_footprint|memory_probe|mqar|ruler> checkpoint=<model directory> [overrides]

Configs: conf/eval/ (schemas in evaluation/config.py). The work is done by evaluation.run.run(cfg).
"""

import hydra
from omegaconf import DictConfig

from evaluation.config import register_configs
from evaluation.run import run

register_configs()


@hydra.main(version_base="1.3", config_path="../conf/eval", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
