"""Run output (interim): metrics.jsonl and one log line per set-up stage.

Replaced by the full RunLogger (TensorBoard, W&B, progress bar) from the report branch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from tandem.config import TandemConfig

log = logging.getLogger("tandem")


class RunLogger:
    """Everything a run writes about itself, in its run directory."""

    def __init__(self, run_dir: str | Path, config: TandemConfig, total_steps: int,
                 start_step: int = 0, console: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps, self.console = total_steps, console
        if start_step and self.path.exists():  # steps logged after the checkpoint come again
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(row + "\n" for row in rows))
        self._last = time.perf_counter()

    def stage(self, message: str) -> None:
        now = time.perf_counter()
        log.info("%s (%.1f s)", message, now - self._last)
        self._last = now

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (float(v) if math.isfinite(v) else None)
                                for k, v in metrics.items()}}
        with open(self.path, "a") as out:
            out.write(json.dumps(row) + "\n")
        log.info("step %d/%d %s", step, self.total_steps, " ".join(
            f"{k}={metrics[k]:.4g}" for k in ("reward/mean", "tandem/senior_token_frac",
                                              "train/loss", "time/step") if k in metrics))

    def close(self) -> None:
        pass

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
