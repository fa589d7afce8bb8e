"""The rollouts the training loop trains on, synchronous or one step ahead (off-policy)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tandem.dynamic_sampling import Scored
from tandem.stop import StopRequest

if TYPE_CHECKING:  # annotations only: it loads torch
    from tandem.data import PromptStream

class Prefetch:
    """The rollouts the loop trains on, and every piece of off-policy state, in one place.

    Synchronous (`background=None`): `take` draws a batch and rolls it out now; `trained`
    pushes the new weights at once. Off-policy: `take` waits for this step's rollout (started
    during the previous step), pushes the weights owed, then starts the next step's rollout in
    the background thread unless this is the last step or a stop was requested.

    What waits for what: a push never lands while a rollout is in flight (owed weights wait for
    `take` or `flush`). A step's first batch is drawn here, in the driver thread; dynamic
    sampling's extra batches are drawn by the step's rollout (off-policy, in the background
    thread) while nothing else touches the stream. So `position` reads a stream nobody is
    advancing: off-policy, where it stood before the step in flight.
    """

    def __init__(self, roll: Callable[[int, list[Any], int], Scored],
                 push: Callable[[int], dict[str, float]], stream: PromptStream,
                 background: ThreadPoolExecutor | None, total: int, stop: StopRequest) -> None:
        self._roll, self._push, self._stream = roll, push, stream
        self._background, self._total, self._stop = background, total, stop
        self._in_flight: Future | None = None  # off-policy: the next step's rollout
        self._in_flight_from: dict | None = None  # the stream's position before its batch
        self._owed: int | None = None  # the version of trained weights not yet pushed
        self.served = 0  # the weight version the senior engines serve

    def take(self, step: int) -> Scored:
        """Step `step`'s rollout; its metrics include those of a push it waited for."""
        if self._background is None:
            before = self._stream.state_dict()
            try:
                return self._roll(step, self._stream.next_batch(), self.served)
            except BaseException:
                self._stream.load_state_dict(before)  # not trained on: a resume draws it again
                raise
        if self._in_flight is None:  # the first step of this invocation
            self._start(step)
        rolled = self._in_flight.result()
        self._in_flight = None
        rolled.metrics.update(self._push_owed())
        if step + 1 < self._total and self._stop.signal is None:
            self._start(step + 1)
        return rolled

    def trained(self, version: int) -> dict[str, float]:
        """The learners hold weights `version` now: push them at once (synchronous) or when no
        rollout is in flight (off-policy); the metrics of a push made now."""
        self._owed = version
        return self._push_owed() if self._background is None else {}

    def flush(self) -> dict[str, float]:
        """Wait for the rollout in flight, then push the weights owed (validation needs the
        engines and the fresh weights)."""
        self.wait()
        return self._push_owed()

    def wait(self) -> None:
        """Wait for the rollout in flight, if any."""
        if self._in_flight is not None:
            self._in_flight.result()

    def position(self) -> dict:
        """Where a resumed run continues: the stream before the batch in flight, if any."""
        return self._stream.state_dict() if self._in_flight is None else self._in_flight_from

    def resume(self, position: dict, version: int) -> None:
        """Continue from a checkpoint: the stream at `position`, the senior engines serving the
        learners' restored weights as `version`."""
        self._stream.load_state_dict(position)
        self._owed = version
        self.flush()

    def restart(self, position: dict, version: int) -> None:
        """Go back to a checkpoint after the learners were restarted: drop the rollout in
        flight (sampled under weights that are gone), then `resume`."""
        if self._in_flight is not None:
            with contextlib.suppress(Exception):
                self._in_flight.result()
            self._in_flight = None
        self.resume(position, version)

    def _start(self, step: int) -> None:
        self._in_flight_from = self._stream.state_dict()
        self._in_flight = self._background.submit(self._roll, step, self._stream.next_batch(),
                                                  self.served)

    def _push_owed(self) -> dict[str, float]:
        if self._owed is None:
            return {}
        metrics = self._push(self._owed)
        self.served, self._owed = self._owed, None
        return metrics
