"""`python -m tandem.train`: tandem GRPO from the command line (Hydra), or `train(config, run_dir)`.

The loop itself, step by step, is tandem/driver.py. This module stays light: a bad override, a
bad `trainer.resume` path or a bad data set fails in a second, before torch, Ray and vLLM load.
In a multirun (`-m`) a point that fails is recorded in its run directory and the sweep goes on
(tandem/sweep.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tandem import checkpoint as ckpt
from tandem.config.compose import CONF_DIR, config_for_app, user_errors
from tandem.config.schema import TandemConfig
from tandem.sweep import run_point

log = logging.getLogger("tandem")


def train(config: TandemConfig, run_dir: str | Path) -> list[dict[str, float]]:
    """Run tandem GRPO; returns the metrics logged for each step of this invocation."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_partial(run_dir)  # what a killed or failed save left: never resumed from
    resume_from = ckpt.find_resume(config.trainer.resume, run_dir)  # a bad path fails at once
    # why here: the driver loads torch, Ray, vLLM and sympy, which a bad path need not wait for
    from tandem.driver import run

    return run(config, run_dir, resume_from)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    if hydra_config.mode == RunMode.MULTIRUN:
        # a failed point is recorded in its run dir and the sweep goes on (tandem/sweep.py)
        run_point(lambda: _train_app(cfg), Path(hydra_config.runtime.output_dir),
                  list(hydra_config.overrides.task))
    else:
        _train_app(cfg)


def _train_app(cfg: DictConfig) -> None:
    config, run_dir = config_for_app(cfg)
    log.info("config ok: senior=%s junior=%s%s data=%s algorithm=%s(schedule=%s, handoff_p=%s) "
             "run dir %s", config.model.senior.path, config.model.junior.path,
             " (self-paired)" if config.model.self_paired else "", config.data.name,
             config.algorithm.name, config.algorithm.schedule, config.algorithm.handoff_p,
             run_dir)
    with user_errors():  # a data set, model or checkpoint it cannot use: one line, exit 2
        train(config, run_dir)


if __name__ == "__main__":
    main()
