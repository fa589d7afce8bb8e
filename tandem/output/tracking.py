"""Everything a run writes about itself: metrics.jsonl, TensorBoard, W&B and the console.

`<run_dir>/metrics.jsonl` is the record every other output is built from (plots.py, report.py
read it with `read_metrics`): one JSON object per logged step, "step" first, then the metrics
as the driver gave them, non-finite values as null. A row is flushed as soon as it is written,
so a killed run leaves at most one truncated last line, which readers drop.

On resume from the checkpoint of step s, rows of steps after s are dropped first (a pre-empted
run may have logged steps it did not checkpoint), so the file holds each step once; TensorBoard
purges the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tandem.config.schema import TandemConfig

log = logging.getLogger("tandem")

METRICS_FILE = "metrics.jsonl"
KEY_METRICS = ("reward/mean", "tandem/senior_token_frac", "train/loss", "time/step")
"""Shown on the console each step, with the validation accuracies when a step has them."""
VAL_METRICS = ("val/solo_accuracy", "val/handoff_accuracy")

Row = dict[str, float | None]


class MetricsError(ValueError):
    """A metrics.jsonl that is missing or corrupt (not just cut short by a kill)."""


def metrics_path(run: str | Path) -> Path:
    """A run directory or a metrics.jsonl path -> the metrics.jsonl path."""
    run = Path(run)
    return run if run.name.endswith(".jsonl") else run / METRICS_FILE


def read_metrics(run: str | Path) -> list[Row]:
    """The rows of a run's metrics.jsonl (a run directory or the file), in file order.

    A last line without its newline that does not parse is a write cut short by a kill and is
    dropped. Raises MetricsError for a missing file or any other line that is not a JSON object
    with an integer "step"; an empty file gives [].
    """
    path = metrics_path(run)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MetricsError(f"{path}: unreadable ({error})") from None
    lines = text.split("\n")
    rows: list[Row] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cut_short = number == len(lines) and not text.endswith("\n")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if cut_short:
                break
            raise MetricsError(f"{path}:{number}: not JSON ({error.msg}): {line[:80]!r}") from None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise MetricsError(f"{path}:{number}: a row must be a JSON object with an integer "
                               f"\"step\", got {line[:80]!r}")
        rows.append(row)
    return rows


def metric_row(step: int, metrics: dict[str, Any]) -> Row:
    """One metrics.jsonl row: "step" first, then each metric as a float; None and non-finite
    values -> None (null in the file)."""
    row: Row = {"step": int(step)}
    for key, value in metrics.items():
        if key == "step":
            continue
        if value is None:
            row[key] = None
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r} must be a number, got {value!r}") from None
        row[key] = number if math.isfinite(number) else None
    return row


BAR_LABELS = {"reward/mean": "reward", "tandem/senior_token_frac": "senior", "train/loss": "loss",
              "time/step": "s/step", "val/solo_accuracy": "val_solo",
              "val/handoff_accuracy": "val_handoff"}
"""Shorter names for the progress bar, which has one terminal line."""


def eta_seconds(step: int, total_steps: int, seconds_per_step: float | None) -> float | None:
    if seconds_per_step is None:
        return None
    return max(total_steps - step, 0) * seconds_per_step


def step_line(step: int, total_steps: int, row: Row, eta: float | None,
              bar: bool = False) -> str:
    """The console's summary of one step: key metrics, validation accuracies, ETA (the bar's
    postfix, with short names, when `bar`)."""
    parts = [] if bar else [f"step {step}/{total_steps}"]
    for key in KEY_METRICS + VAL_METRICS:
        value = row.get(key)
        if value is not None:
            name = BAR_LABELS[key] if bar else key
            parts.append(f"{name}={value:.4g}" + ("s" if key == "time/step" and not bar else ""))
    if step < total_steps:
        parts.append(f"eta {_clock(eta)}")
    return " ".join(parts)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class RunLogger:
    """Everything a run writes about itself, in its run directory.

    `stream` (default stdout) is the console: a progress bar when it is a terminal, one plain
    line per step otherwise (CI, `ray job submit` logs). Lines also go to the `tandem` logger.
    """

    def __init__(self, run_dir: str | Path, config: TandemConfig, total_steps: int,
                 start_step: int = 0, console: bool = True, stream: TextIO | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.total_steps, self.start_step, self.console = total_steps, start_step, console
        self._stream = stream if stream is not None else sys.stdout
        self._closed = False
        self._file = self._tensorboard = self._wandb = self._bar = self._redirect = None
        self._keep_steps_up_to(start_step)
        try:  # a sink that fails to open closes the ones already open
            self._file = open(self.path, "a")  # noqa: SIM115 - held until close()
            if config.trainer.tensorboard:
                self._tensorboard = _open_tensorboard(self.run_dir, start_step)
            if config.trainer.wandb:
                self._wandb = _open_wandb(self.run_dir, config)
            if console and _is_terminal(self._stream):
                self._open_bar()
        except BaseException:
            self.close()
            raise
        self._last_stage = time.perf_counter()
        self._first_step: tuple[float, int] | None = None  # first step logged by this process

    def stage(self, message: str) -> None:
        now = time.perf_counter()
        self._say(f"{message} ({now - self._last_stage:.1f} s)")
        self._last_stage = now

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("RunLogger.log after close()")
        row = metric_row(step, metrics)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        values = {k: v for k, v in row.items() if k != "step" and v is not None}
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        eta = self._eta(step, row)
        if self._bar is not None:
            self._bar.n = min(step, self.total_steps)
            self._bar.set_postfix_str(step_line(step, self.total_steps, row, eta, bar=True))
            log.debug(step_line(step, self.total_steps, row, eta))
        else:
            self._say(step_line(step, self.total_steps, row, eta))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ internals

    def _keep_steps_up_to(self, start_step: int) -> None:
        # A fresh run (start 0) checkpointed nothing, so every row of an earlier try goes.
        if not self.path.exists():
            return
        try:
            rows = read_metrics(self.path)
        except MetricsError as error:
            aside = self.path.with_name(METRICS_FILE + ".corrupt")
            self.path.replace(aside)
            log.warning("%s; moved it to %s and started a new metrics.jsonl", error, aside)
            return
        kept = [r for r in rows if start_step > 0 and r["step"] <= start_step]
        if len(kept) < len(rows):
            log.info("metrics.jsonl: dropped %d rows of steps after step %d (not checkpointed)",
                     len(rows) - len(kept), start_step)
        tmp = self.path.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        tmp.replace(self.path)

    def _eta(self, step: int, row: Row) -> float | None:
        now = time.perf_counter()
        if step <= self.start_step:
            return None
        if self._first_step is None:
            self._first_step = (now, step)
            return eta_seconds(step, self.total_steps, row.get("time/step"))
        first_time, first = self._first_step
        if step == first:
            return eta_seconds(step, self.total_steps, row.get("time/step"))
        return eta_seconds(step, self.total_steps, (now - first_time) / (step - first))

    def _open_bar(self) -> None:
        self._bar = tqdm(total=self.total_steps, initial=self.start_step, file=self._stream,
                         unit="step", dynamic_ncols=True,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        # Console log handlers write through tqdm while the bar is up, so lines never split it.
        # Only loggers that have one: tqdm would add a second, unformatted handler to the rest.
        self._redirect = logging_redirect_tqdm(loggers=[
            node for node in _loggers_to(log) if any(_is_console(h) for h in node.handlers)])
        self._redirect.__enter__()

    def _say(self, line: str) -> None:
        log.info(line)
        if not self.console or _reaches_console(log):
            return
        if self._bar is not None:
            self._bar.write(line, file=self._stream)
        else:
            print(line, file=self._stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _is_console(handler: logging.Handler) -> bool:
    if type(handler).__name__ == "_TqdmLoggingHandler":  # a console handler, routed via the bar
        return True
    return (isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__,
                                                     sys.__stderr__))


def _loggers_to(logger: logging.Logger) -> list[logging.Logger]:
    """The loggers a record of `logger` passes through: itself and its ancestors."""
    chain: list[logging.Logger] = []
    node: logging.Logger | None = logger
    while node is not None:
        chain.append(node)
        node = node.parent if node.propagate else None
    return chain


def _reaches_console(logger: logging.Logger) -> bool:
    """Whether an INFO record of `logger` already lands on stdout/stderr (e.g. under Hydra)."""
    return logger.isEnabledFor(logging.INFO) and any(
        _is_console(h) and h.level <= logging.INFO for node in _loggers_to(logger)
        for h in node.handlers)


def _open_tensorboard(run_dir: Path, start_step: int) -> Any:
    try:
        # why: torch + tensorboard take ~3 s; plots, report and smoke only read metrics.jsonl
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(f"trainer.tensorboard=true needs the tensorboard package ({error}); "
                          "pip install tensorboard, or set trainer.tensorboard=false") from None
    # purge_step: events of steps after the checkpoint we resume from are hidden, as in
    # metrics.jsonl.
    return SummaryWriter(str(run_dir / "tensorboard"),
                         purge_step=start_step + 1 if start_step > 0 else None)


def _open_wandb(run_dir: Path, config: TandemConfig) -> Any:
    try:
        import wandb  # why: optional, not a dependency; trainer.wandb=false never needs it
    except ImportError:
        log.warning("trainer.wandb=true but the wandb package is not installed: logging to "
                    "metrics.jsonl%s only; pip install wandb, or set trainer.wandb=false",
                    " and TensorBoard" if config.trainer.tensorboard else "")
        return None
    # The run id lives in the run directory so a resumed run continues the same W&B run.
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    try:
        return wandb.init(project=config.trainer.wandb_project, id=run_id, resume="allow",
                          name=run_dir.name, dir=str(run_dir),
                          config=dataclasses.asdict(config))
    except Exception as error:  # wandb raises several types for login/network problems
        raise RuntimeError(f"wandb.init failed: {error}; log in (`wandb login`), set "
                           "WANDB_MODE=offline, or set trainer.wandb=false") from error
