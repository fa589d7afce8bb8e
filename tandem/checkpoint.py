"""Run checkpoints: where they live, which one to resume, and the driver's own state.

A checkpoint is `<run dir>/checkpoints/step_NNNNNN/` (N = optimizer steps done) with the
learner's sharded model and optimizer (torch.distributed.checkpoint, written by every rank),
each rank's scheduler/RNG state, and `trainer_state.json`: the step (also the weight version
the senior engines serve once resumed), the prompt stream's position and the seed.
`trainer_state.json` is written last, so a directory without it (a save cut short by
pre-emption) is never resumed from.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from tandem.config.checks import InputError

log = logging.getLogger("tandem")

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class ResumeError(InputError, FileNotFoundError):
    """`trainer.resume` names no checkpoint this run can continue from."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint `trainer.resume` names: none -> None; auto -> the newest complete one in
    the run directory (None if there is none); else a path that must be a complete checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        hint = complete_checkpoints(path)  # a run directory was given
        if hint:
            raise ResumeError(f"trainer.resume={resume!r} is a run directory; give one of "
                              f"its checkpoints (newest: {hint[-1]}) or trainer.resume="
                              "auto with hydra.run.dir set to it")
        raise ResumeError(f"trainer.resume={resume!r} is not a complete checkpoint (no "
                          f"{STATE_FILE}); checkpoints are <run dir>/checkpoints/step_N")
    return path


def write_state(directory: Path, state: dict) -> None:
    """Write the driver's state last: its presence marks the checkpoint complete."""
    partial = directory / (STATE_FILE + ".tmp")
    partial.write_text(json.dumps(state, indent=2))
    partial.rename(directory / STATE_FILE)


def read_state(directory: Path) -> dict:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ResumeError(f"checkpoint {directory}: {STATE_FILE} is unreadable "
                          f"({type(error).__name__}); resume from another one with "
                          "trainer.resume=<run dir>/checkpoints/step_N") from None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep = 0 keeps all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: removed %s (trainer.keep_checkpoints=%d)", old, keep)
