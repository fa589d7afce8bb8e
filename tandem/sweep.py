"""Hydra multirun sweeps that go on past a failed point and say, at the end, which failed.

Why: Hydra's basic launcher runs the points one after another in this process. An exception in
one point is kept until the batch ends, then the first one is raised (the others are never
named), and a `sys.exit` (a config error) or a BaseException (torch's CheckpointException)
ends the whole sweep at once. A sweep of hours should lose only the points that failed.

So `run_point` runs one point and catches its failure: the error goes to
`<run dir>/failed.json` (overrides, one-line error, traceback) and the log, and the sweep
goes on. `SweepSummary`, a Hydra callback named in conf/config.yaml, reads every failed.json
under the sweep directory when the sweep ends (so it works with any launcher), lists the
failed points and exits 1. `python -m tandem.output.report SWEEP_DIR` lists them too.
Ctrl-C still stops the sweep. Under Hydra's parallel launchers (`hydra/launcher=tandem_ray`,
`tandem_slurm`; conf/hydra/launcher/) `run_point` runs inside each point's own process (a Ray
task, a SLURM job), so the same holds there; the callback runs in the sweeping process.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("tandem")

FAILED_FILE = "failed.json"


def run_point(run: Callable[[], Any], run_dir: Path, overrides: Sequence[str]) -> bool:
    """Run one sweep point; False (and `<run dir>/failed.json` written) if it failed."""
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # a point run again starts clean
    try:
        run()
        return True
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: B036 - recorded, and the sweep goes on
        if isinstance(error, SystemExit) and error.code in (0, None):
            return True
        reason = failure_line(error)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED_FILE).write_text(json.dumps({
            "overrides": list(overrides), "error": reason,
            "traceback": "".join(traceback.format_exception(error))}, indent=2))
        log.error("sweep point failed (%s): %s; the sweep goes on", " ".join(overrides), reason)
        return False


def failure_line(error: BaseException) -> str:
    """The error in one line. A `sys.exit` raised while handling an error (the config error
    exit of `config_for_app`) is described by that error."""
    if isinstance(error, SystemExit) and error.__context__ is not None:
        error = error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")[:500]


def failed_points(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every failed.json under a sweep directory, each with its `run_dir`, in path order."""
    found = []
    for path in sorted(Path(sweep_dir).rglob(FAILED_FILE)):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            entry = {"overrides": [], "error": f"unreadable {FAILED_FILE}: {error}"}
        found.append({**entry, "run_dir": str(path.parent)})
    return found


class SweepSummary(Callback):
    """At the end of a multirun: list the failed points and exit 1 if there are any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_points(sweep_dir)
        if not failed:
            return
        lines = [f"tandem: {len(failed)} sweep point(s) failed (see each run dir's "
                 f"{FAILED_FILE}; `python -m tandem.output.report {sweep_dir}` lists them):"]
        lines += [f"  {' '.join(f['overrides']) or f['run_dir']}: {f['error']}" for f in failed]
        print("\n".join(lines), file=sys.stderr)
        # SystemExit, not an exception: Hydra's callback runner would turn one into a warning
        raise SystemExit(1)
