"""`python -m tandem.train`: compose the config, validate it, run tandem GRPO.

The training loop lands with the driver issue; until then the app composes and validates the
config (so bad values fail in seconds, before Ray or any engine starts) and stops.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from tandem.config import CONF_DIR, ConfigError, to_config

log = logging.getLogger("tandem")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = to_config(cfg)
    except ConfigError as error:
        print(f"tandem: config error: {error}", file=sys.stderr)
        sys.exit(2)
    log.info(
        "config ok: senior=%s junior=%s%s data=%s algorithm=%s(schedule=%s, handoff_p=%s)",
        config.model.senior.path, config.model.junior.path,
        " (self-paired)" if config.model.self_paired else "",
        config.data.name, config.algorithm.name, config.algorithm.schedule,
        config.algorithm.handoff_p,
    )
    log.info("the training loop is not implemented yet (driver issue); stopping after validation")


if __name__ == "__main__":
    main()
