"""An engine's processes, named so that a driver can end them after their actor died.

A process is named by (pid, start time): a pid alone may name another process by the time it is
reaped, and the start time tells them apart. Plain psutil, no vLLM: the reaper runs as a Ray
task on the engine's node."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Iterator, Sequence

import psutil

Process = tuple[int, float]
"""(pid, start time in seconds since the epoch, as psutil reports it)."""


def process_ids(pids: Sequence[int]) -> list[Process]:
    """The running processes among `pids`, each with its start time."""
    named = []
    for pid in pids:
        try:
            named.append((pid, psutil.Process(pid).create_time()))
        except psutil.NoSuchProcess:
            pass
    return named


def kill_processes(processes: Sequence[Process]) -> int:
    """SIGKILL each process that still runs and is still the one named; how many were."""
    killed = 0
    for pid, started in processes:
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.kill()
                killed += 1
        except psutil.NoSuchProcess:
            pass
    return killed


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Make this process (vLLM's EngineCore) end when its parent, the engine actor, ends.

    A SIGKILLed actor — `ray.kill`, a lost node's raylet, a start interrupted by a stop —
    otherwise leaves its EngineCore running with the model's memory and pinned cores. Linux
    only (elsewhere a no-op); an orphan that got here after its parent died exits at once."""
    parent = multiprocessing.parent_process()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


@contextlib.contextmanager
def spawn_environment(**values: str | None) -> Iterator[None]:
    """Set the environment variables given a value (None: leave as is) for the block, in which
    the caller spawns a process that inherits them; then put back what was there."""
    given = {name: value for name, value in values.items() if value is not None}
    saved = {name: os.environ.get(name) for name in given}
    os.environ.update(given)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
