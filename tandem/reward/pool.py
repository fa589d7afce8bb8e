"""`RewardPool`: grading in killable worker processes, so no answer can stall or kill training."""

from __future__ import annotations

import math
import multiprocessing
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from tandem.config.checks import resolve_callable
from tandem.config.schema import DEFAULT_REWARD_FN
from tandem.reward.answer import answer_of
from tandem.reward.grade import (
    Verdict,
    call_fn,
    check_texts,
    judge_box,
    self_check,
    verdict_without_sympy,
)

if TYPE_CHECKING:
    from tandem.config.schema import RewardConfig

# A worker imports sympy and math-verify (~1-3 s) and self-checks before it takes work.
_START_TIMEOUT_S = 120.0


Judge = Callable[[str, str, int], Verdict]


def _worker_main(conn: Connection, math_timeout_s: int, judge: Judge, fn_spec: str | None
                 ) -> None:
    # Ctrl-C reaches the whole process group, and `ray job stop` / Slurm SIGTERM every process
    # of the job: the parent decides when workers stop, after finishing its step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        self_check()
        fn = resolve_callable(fn_spec, "reward.fn") if fn_spec is not None else None
    except Exception:  # reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        kind, *args = job
        try:
            if kind == "box":  # (box, answer)
                verdict = judge(*args, math_timeout_s)
            else:  # "fn": (problem, response, answer, metadata)
                verdict = call_fn(fn, *args)
            conn.send(("verdict", verdict))
        except Exception:
            # Not a grading outcome (e.g. a bad gold answer): the parent re-raises it.
            conn.send(("error", traceback.format_exc()))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    job: int | None = None  # index of the response in flight
    deadline: float = 0.0  # monotonic time by which it must be ready / answer


class RewardPool:
    """Scores responses with `verify_one` in worker processes, each item under a hard deadline.

    An item that overruns `timeout_s` gets "timeout" and its worker is killed and replaced;
    an item whose worker dies (a segfault in C code, the OOM killer, ``os._exit``) gets
    "crashed" and the worker is replaced. Either way the item scores 0, the pool keeps its
    size and training goes on, however many fail in a row. One `score` call is bounded too:
    after ``timeout_s`` per item per worker plus one worker start-up (or the caller's
    budget), what is left is scored "timeout": respawns after crashes could otherwise add up.
    Workers are started with 'spawn' (never fork: the parent runs Ray and vLLM threads), so each
    one re-imports the parent's ``__main__`` module: keep a script's work under
    ``if __name__ == "__main__"``. `score` may be called from any thread; calls are
    serialised. Use as a context manager, or call `close`.

    `judge` grades one box in a worker: a module-level function, since each worker imports
    it by name. Only tests change it, to make a worker die for real. `fn` is a `reward.fn`
    plug-in (package.module:callable) that `score_fn` runs; None or the default is the paper's
    reward, graded as `score` grades.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, max_answer_chars: int = 1000,
                 answer_from: str = "boxed", *, boxes: str = "last", fn: str | None = None,
                 judge: Judge = judge_box):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        answer_of("", answer_from, boxes)  # an unknown value fails here, not at the first batch
        self.fn = None if fn == DEFAULT_REWARD_FN else fn
        if self.fn is not None:
            resolve_callable(self.fn, "reward.fn")  # here, not in each worker's start-up
        self.boxes = boxes
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.answer_from = answer_from
        self.judge = judge
        # math-verify's alarm takes whole seconds; at half the deadline most slow items end
        # inside the worker, which is cheaper than a respawn. The kill still bounds C code
        # that never yields to the alarm, and math-verify's per-pair alarms adding up.
        self.math_timeout_s = max(1, int(timeout_s / 2))
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        started = False
        try:
            self._workers = [self._start_worker() for _ in range(num_workers)]
            while not all(w.ready for w in self._workers):
                self._wait_and_collect([])
            started = True
        finally:
            if not started:
                self.close()

    @classmethod
    def from_config(cls, reward: RewardConfig) -> RewardPool:
        """The pool a run's `reward` section describes."""
        return cls(reward.num_workers, reward.timeout_s, reward.max_answer_chars,
                   reward.answer_from, boxes=reward.boxes, fn=reward.fn)

    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of the current workers (for monitoring)."""
        return [w.process.pid for w in self._workers]

    def score(self, responses: list[str], answers: list[str],
              budget_s: float | None = None) -> list[Verdict]:
        """Grade ``responses[i]`` against gold ``answers[i]``; verdicts in the same order.

        Missing, empty and over-long boxes are graded here without a worker; the rest run
        in parallel on the workers, within `budget_s` in all (default `call_budget_s`): what
        is not graded by then is scored "timeout". Raises TypeError for a non-str response or
        answer, ValueError for an empty gold, and RuntimeError if a worker reports an error
        that is not a grading outcome (e.g. a gold answer math-verify cannot read).
        """
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} gold answers")
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        verdicts: list[Verdict | None] = [None] * len(responses)
        jobs: deque[tuple[int, tuple]] = deque()
        for i, (response, answer) in enumerate(zip(responses, answers, strict=True)):
            check_texts(response, answer, index=i)
            box = answer_of(response, self.answer_from, self.boxes)
            verdicts[i] = verdict_without_sympy(box, self.max_answer_chars)
            if verdicts[i] is None:
                jobs.append((i, ("box", box, answer)))
        return self._score_jobs(jobs, verdicts, budget_s)

    def score_fn(self, problems: list[str], responses: list[str], answers: list[str],
                 metadata: list[dict[str, Any]], budget_s: float | None = None
                 ) -> list[Verdict]:
        """The training reward: the `reward.fn` plug-in on each (problem, response, gold,
        metadata), under the same per-item deadline and call budget as `score`; with the
        default fn, `score`. The run's grading settings are added to each metadata dict."""
        if self.fn is None:
            return self.score(responses, answers, budget_s)
        if not len(problems) == len(responses) == len(answers) == len(metadata):
            raise ValueError(f"{len(problems)} problems, {len(responses)} responses, "
                             f"{len(answers)} gold answers and {len(metadata)} metadata")
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        settings = {"answer_from": self.answer_from, "boxes": self.boxes,
                    "max_answer_chars": self.max_answer_chars,
                    "math_timeout_s": self.math_timeout_s}
        jobs: deque[tuple[int, tuple]] = deque()
        for i, (problem, response, answer, meta) in enumerate(
                zip(problems, responses, answers, metadata, strict=True)):
            check_texts(response, answer, index=i)
            jobs.append((i, ("fn", problem, response, answer, {**meta, **settings})))
        return self._score_jobs(jobs, [None] * len(responses), budget_s)

    def _score_jobs(self, jobs: deque[tuple[int, tuple]], verdicts: list[Verdict | None],
                    budget_s: float | None) -> list[Verdict]:
        with self._lock:
            if not self._workers:
                raise RuntimeError("RewardPool is closed; create a new one")
            if budget_s is None:
                budget_s = self.call_budget_s(len(jobs))
            self._run(jobs, verdicts, budget_s)
        return verdicts

    def call_budget_s(self, num_jobs: int) -> float:
        """How long grading `num_jobs` items may take in all: each worker's share at the full
        per-item deadline, plus one worker start-up."""
        return self.timeout_s * math.ceil(num_jobs / len(self._workers)) + _START_TIMEOUT_S

    def _run(self, jobs: deque[tuple[int, tuple]], verdicts: list[Verdict | None],
             budget_s: float) -> None:
        # Consumes `jobs`; each turn hands one job to every idle worker, then waits for
        # a message or a death from any started/busy worker, unblocked no later than the
        # earliest deadline, when the overdue worker is killed, or the call's own deadline,
        # when everything left is scored "timeout".
        call_deadline = time.monotonic() + budget_s
        try:
            while jobs or any(w.job is not None for w in self._workers):
                if time.monotonic() >= call_deadline:
                    self._give_up(jobs, verdicts, f"reward call over its {budget_s:g} s budget")
                    return
                for slot, worker in enumerate(self._workers):
                    if not (jobs and worker.ready and worker.job is None):
                        continue
                    if not worker.process.is_alive():  # died while idle: not the job's fault
                        self._replace(slot)
                        continue
                    index, job = jobs.popleft()
                    try:
                        worker.conn.send(job)
                    except (BrokenPipeError, ConnectionResetError):  # died since is_alive()
                        jobs.appendleft((index, job))
                        self._replace(slot)
                        continue
                    worker.job = index
                    worker.deadline = time.monotonic() + self.timeout_s
                self._wait_and_collect(verdicts, call_deadline)
        finally:
            # After an error, in-flight results would leak into the next call: drop them.
            for slot, worker in enumerate(self._workers):
                if worker.job is not None:
                    self._replace(slot)

    def _give_up(self, jobs: deque[tuple[int, tuple]], verdicts: list[Verdict | None],
                 detail: str) -> None:
        while jobs:
            verdicts[jobs.popleft()[0]] = Verdict("timeout", detail)
        for slot, worker in enumerate(self._workers):
            if worker.job is not None:
                verdicts[worker.job] = Verdict("timeout", detail)
                worker.job = None
                self._replace(slot)

    def _wait_and_collect(self, verdicts: list[Verdict | None],
                          call_deadline: float = math.inf) -> None:
        waiting = [(s, w) for s, w in enumerate(self._workers) if not w.ready or w.job is not None]
        if not waiting:
            return
        earliest = min(call_deadline, *(w.deadline for _, w in waiting))
        handles = [h for _, w in waiting for h in (w.conn, w.process.sentinel)]
        wait(handles, timeout=max(0.0, earliest - time.monotonic()))
        for slot, worker in waiting:
            if worker.conn.poll():
                try:
                    kind, payload = worker.conn.recv()
                except EOFError:
                    kind, payload = "died", None
            elif not worker.process.is_alive():
                kind, payload = "died", None
            else:
                if time.monotonic() >= worker.deadline:
                    self._on_overdue(slot, verdicts)
                continue
            if kind == "ready":
                worker.ready = True
            elif kind == "verdict":
                verdicts[worker.job] = payload
                worker.job = None
            elif kind == "died":
                self._on_death(slot, verdicts)
            elif kind == "error" and not worker.ready:
                raise RuntimeError(f"reward worker failed to start:\n{payload}")
            elif kind == "error":
                index, worker.job = worker.job, None  # it replied, so it can stay
                raise RuntimeError(f"reward worker failed on item {index}:\n{payload}")
            else:
                raise RuntimeError(f"unknown reward worker message {kind!r}")

    def _on_overdue(self, slot: int, verdicts: list[Verdict | None]) -> None:
        worker = self._workers[slot]
        if not worker.ready:
            raise RuntimeError(
                f"reward worker did not start within {_START_TIMEOUT_S:.0f} s; check that "
                "'python -c \"import tandem.reward\"' is quick on this machine"
            )
        verdicts[worker.job] = Verdict("timeout", f"killed after {self.timeout_s} s")
        worker.job = None
        self._replace(slot)

    def _on_death(self, slot: int, verdicts: list[Verdict | None]) -> None:
        worker = self._workers[slot]
        worker.process.join(timeout=1.0)  # EOF can arrive before the exit code
        if not worker.ready:
            raise RuntimeError(
                f"reward worker exited during start-up (exit code {worker.process.exitcode}); "
                "check that 'python -c \"import tandem.reward\"' works"
            )
        if worker.job is not None:
            verdicts[worker.job] = Verdict("crashed", _exit_reason(worker.process.exitcode))
            worker.job = None
        self._replace(slot)

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self.math_timeout_s, self.judge, self.fn),
            name="tandem-reward",
            daemon=True,
        )
        process.start()
        # Drop our copy of the child's end so that its death reads as EOF here.
        child_conn.close()
        return _Worker(process, parent_conn, deadline=time.monotonic() + _START_TIMEOUT_S)

    def _replace(self, slot: int) -> None:
        _stop(self._workers[slot])
        self._workers[slot] = self._start_worker()

    def close(self) -> None:
        """Stop all workers. Safe to call twice."""
        workers, self._workers = self._workers, []
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:  # already dead
                pass
        for worker in workers:
            worker.process.join(timeout=2.0)
            _stop(worker)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


def _stop(worker: _Worker) -> None:
    # SIGTERM first; SIGKILL if it is stuck where the default handler cannot run.
    if worker.process.is_alive():
        worker.process.terminate()
        worker.process.join(timeout=1.0)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.conn.close()
