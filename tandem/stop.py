"""Pre-emption: SIGTERM or SIGINT lets the current step finish, then checkpoint and exit.

`StopRequest` is installed by the driver (tandem/driver.py) once Ray is up (ray.init installs
its own SIGTERM handler, which exits at once). During start-up a stop raises `Stopped` at once;
afterwards the step in progress ends first, unless `trainer.stop_grace_s` runs out during a
phase that may be given up. docs/reliability.md has the whole story and its measured times.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any

log = logging.getLogger("tandem")


class Stopped(Exception):  # noqa: N818 (a request, not an error)
    """Raised in the driver by a stop that cannot wait: during start-up, or a step that ran
    past `trainer.stop_grace_s`."""


def stop_behind(error: BaseException) -> Stopped | None:
    """The `Stopped` an exception carries: raised from a signal handler while the driver was
    inside a C extension (Ray's `get`), it may come out wrapped, e.g. as a SystemError caused
    by it."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Stopped):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class StopRequest:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit. A second SIGINT interrupts at once.

    During start-up (`starting`) nothing is worth finishing: the signal raises `Stopped` at
    once, and the actors started so far are shut down. With a grace (`trainer.stop_grace_s`)
    an alarm goes off that long after the signal; if the driver is then in a phase it may
    give up (`abandonable`: rollout, reward, validation — nothing of the step has reached
    the learners, or the learners are done with it) it raises `Stopped`; otherwise the phase
    ends first (a learner update or a push is never cut) and the next abandonable one raises.
    """

    def __init__(self, grace_s: float | None = None) -> None:
        self.signal: str | None = None
        self.starting = True
        self.grace_s = grace_s
        self.expired = False
        self._abandonable = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number, handler in ((signal.SIGTERM, self._handle),
                                    (signal.SIGINT, self._handle),
                                    (signal.SIGALRM, self._expire)):
                self._previous[number] = signal.signal(number, handler)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        first, self.signal = self.signal is None, signal.Signals(number).name
        if self.starting:
            raise Stopped(f"{self.signal} during start-up")
        log.warning("%s: finishing this step, then checkpointing and stopping%s "
                    "(send SIGINT again to stop now)", self.signal,
                    "" if self.grace_s is None else
                    f"; a rollout still running in {self.grace_s:g} s is given up "
                    "(trainer.stop_grace_s)")
        if first and self.grace_s is not None:
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _expire(self, number: int, frame: Any) -> None:
        self.expired = True
        if self._abandonable:
            raise Stopped(f"the step ran past trainer.stop_grace_s={self.grace_s:g} s after "
                          f"{self.signal}")

    @contextlib.contextmanager
    def abandonable(self) -> Any:
        """A phase the stop may give up once the grace is spent."""
        if self.expired:
            raise Stopped(f"the step ran past trainer.stop_grace_s={self.grace_s:g} s after "
                          f"{self.signal}")
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False

    def __exit__(self, *exc_info: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in self._previous.items():
            signal.signal(number, handler)
