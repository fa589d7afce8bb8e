"""Run checkpoints: where they live, which one to resume, and how one is written atomically.

A checkpoint is `<run dir>/checkpoints/step_NNNNNN/` (N = optimizer steps done) with the
learner's sharded model and optimizer (torch.distributed.checkpoint, written by every rank),
each rank's scheduler/RNG state, and `trainer_state.json`: the step (also the weight version
the senior engines serve once resumed), the prompt stream's position and the seed.

Why atomic: a pre-empted or killed writer, or a full disk, must never leave a directory that
looks like a checkpoint, nor damage the one before it. So a save writes everything into a
fresh `checkpoints/.partial-step_N-*` directory, `trainer_state.json` last, fsyncs every file
and directory in it, and only then renames it to `step_N`. Saving a step again (a run resumed
from an older checkpoint) moves the old `step_N` aside first, so its completion marker never
stands over shards of another save. Whatever a crash leaves (`.partial-*`, `.replaced-*`) is
deleted by `remove_partial`, which the driver calls at every start, so a crash loop cannot
fill the disk. `trainer_state.json` is still what makes a `step_N` complete.
No torch here: the driver imports this module before torch loads (fast config errors).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from tandem.config.checks import InputError

log = logging.getLogger("tandem")

STATE_FILE = "trainer_state.json"
PARTIAL_PREFIX = ".partial-"
"""A save in progress, or cut short: never resumed from, deleted at the next start."""
REPLACED_PREFIX = ".replaced-"
"""An older save of the same step, moved aside while the new one is renamed into place."""
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FULL_BELOW_BYTES = 1 << 20
"""Free space under which a failed save is reported as a full disk, whatever the error said."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or is not safe to load; the message says what to do."""


class ResumeError(InputError, FileNotFoundError):
    """`trainer.resume` names no checkpoint this run can continue from."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    return complete_dirs(Path(run_dir) / "checkpoints", lambda path: (path / STATE_FILE).is_file())


def complete_dirs(root: Path, complete: Callable[[Path], bool]) -> list[Path]:
    """The `step_N` directories in `root` that `complete` accepts, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and complete(p)]
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
    with open(partial, "w") as out:
        out.write(json.dumps(state, indent=2))
        out.flush()
        os.fsync(out.fileno())
    partial.rename(directory / STATE_FILE)


def read_state(directory: Path) -> dict:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ResumeError(f"checkpoint {directory}: {STATE_FILE} is unreadable "
                          f"({type(error).__name__}); resume from another one with "
                          "trainer.resume=<run dir>/checkpoints/step_N") from None


def save(run_dir: str | Path, step: int, write: Callable[[Path], None], state: dict) -> Path:
    """Write the checkpoint of `step` atomically and return its directory.

    `write(directory)` writes the learners' files into a fresh partial directory; then the
    driver's `state` goes in last, everything is fsynced and the directory renamed to `step_N`.
    On any failure the partial directory is deleted (its space is freed at once) and a
    CheckpointError says why; the checkpoints already there are untouched.
    """
    root = Path(run_dir) / "checkpoints"

    def write_all(partial: Path) -> None:
        write(partial)
        write_state(partial, state)

    def failed(error: BaseException) -> Exception:  # measured before the partial is freed
        return CheckpointError(_save_failed(run_dir, step, error, _disk_full(error, root)))

    return publish(checkpoint_dir(run_dir, step), write_all, failed)


def publish(target: Path, write: Callable[[Path], None],
            failed: Callable[[BaseException], Exception] | None = None) -> Path:
    """Write the directory `target` atomically and return it: `write(partial)` fills a fresh
    `.partial-<name>-*` directory beside it, every file and directory in it is fsynced, then it
    is renamed to `target`, replacing a `target` that exists as a whole (`_put_in_place`). On
    any failure the partial directory is deleted and the error raised, or `failed(error)` (built
    before the partial's space is freed) raised from it; `target` is untouched."""
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{target.name}-", dir=root))
    try:
        write(partial)
        sync_tree(partial)
        return _put_in_place(partial, target)
    except BaseException as error:  # torch's CheckpointException is a BaseException
        replacement = None
        if failed is not None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
            replacement = failed(error)
        shutil.rmtree(partial, ignore_errors=True)
        if replacement is None:
            raise
        raise replacement from error


def _put_in_place(partial: Path, target: Path) -> Path:
    # rename(2) cannot replace a non-empty directory, and the old marker must never stand over
    # new shards: move the old save aside whole, rename the new one in, then delete the old.
    replaced = None
    if target.exists():
        replaced = target.with_name(f"{REPLACED_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")
        target.rename(replaced)
    partial.rename(target)
    fsync_dir(target.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return target


def _disk_full(error: BaseException, root: Path) -> bool:
    # Ray wraps a rank's OSError in its own error type, and torch's zip writer reports ENOSPC
    # as "unexpected pos": look at the text, and at the free space the failed save left.
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if os.strerror(errno.ENOSPC) in str(error):
        return True
    return shutil.disk_usage(root).free < _FULL_BELOW_BYTES


def _save_failed(run_dir: str | Path, step: int, error: BaseException, full: bool) -> str:
    text = f"{type(error).__name__}: {error}"
    found = complete_checkpoints(run_dir)
    before = f"the newest checkpoint, {found[-1]}, is intact" if found else "no checkpoint before"
    last_line = text.strip().splitlines()[-1][:300]
    reason = f"the disk is full (the writer said: {last_line})" if full else last_line
    hint = (f"; free space under {Path(run_dir) / 'checkpoints'} or lower "
            "trainer.keep_checkpoints (a save needs room for one more checkpoint)" if full else "")
    return (f"checkpoint of step {step} not saved: {reason}; {before}{hint}; resume with "
            f"trainer.resume=auto hydra.run.dir={run_dir}")


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete what interrupted saves left in `<run dir>/checkpoints` and return it: partial
    directories, and step directories without a completion marker (written in place by older
    versions). A save interrupted between moving an old `step_N` aside and renaming the new
    one in leaves no `step_N`: the old one is put back instead of deleted."""
    return remove_unpublished(Path(run_dir) / "checkpoints",
                              lambda path: (path / STATE_FILE).is_file())


def remove_unpublished(root: Path, complete: Callable[[Path], bool]) -> list[Path]:
    """Delete what interrupted `publish` calls left in `root` and return it: `.partial-*`
    entries, `.replaced-*` ones (put back as their `step_N` when that is missing and
    `complete` says they are whole) and `step_N` directories that `complete` rejects."""
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(REPLACED_PREFIX):
            step_name = path.name[len(REPLACED_PREFIX):].rsplit("-", 1)[0]
            if complete(path) and not (root / step_name).exists():
                path.rename(root / step_name)
                log.warning("%s: restored %s from an interrupted re-save", root.name, step_name)
                continue
        elif not (path.name.startswith(PARTIAL_PREFIX)
                  or (_STEP_DIR.match(path.name) and not complete(path))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
        removed.append(path)
        log.warning("%s: removed %s, left by an interrupted save", root.name, path)
    if removed:
        fsync_dir(root)
    return removed


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep = 0 keeps all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: removed %s (trainer.keep_checkpoints=%d)", old, keep)


def sync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory`, itself included: what a rename
    publishes must already be on disk, not only in this node's page cache."""
    for parent, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(parent))


def fsync_dir(directory: Path) -> None:
    """fsync a directory: makes the renames and new entries in it durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
