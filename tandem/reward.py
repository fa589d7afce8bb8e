"""Binary verifiable reward: is the team's last ``\\boxed{...}`` equal to the gold answer?

A response earns 1.0 when math-verify finds the content of its last complete ``\\boxed{}``
equivalent to the gold answer, else 0.0. Each response gets a `Verdict` whose status says
why, and `reward_metrics` turns a batch of verdicts into ``reward/*`` metrics, so parse
failures, missing boxes, timeouts and crashes show up in the logs instead of hiding as 0.0.

Why a process pool: math-verify bounds sympy with ``signal.alarm``, which only works on a
process's main thread, while the trainer scores from Ray/vLLM threads; and some inputs
(huge exponent towers, deep nesting) can run for a long time or crash the interpreter.
`RewardPool` runs `verify_one` in spawned worker processes, keeps math-verify's alarm as a
cheap first line, and kills and replaces a worker that overruns a hard per-item deadline.

Choices made here: the answer is the *last* complete box (brace-balanced; earlier boxes
and unboxed text are ignored), and a box longer than ``max_answer_chars`` is a parse
error without calling sympy (see `verify_one`).
"""

from __future__ import annotations

import multiprocessing
import re
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from typing import Literal, get_args

import math_verify
from math_verify.errors import TimeoutException
from sympy import Basic, MatrixBase

Status = Literal["correct", "wrong", "no_box", "parse_error", "timeout", "crashed"]
STATUSES: tuple[str, ...] = get_args(Status)

# A worker imports sympy and math-verify (~1-3 s) and self-checks before it takes work.
_START_TIMEOUT_S = 120.0

# Gold and box content are both parsed as inline LaTeX ("$...$"): unwrapped, the latex
# extractor finds nothing in "0.5" and the expression extractor reads "[0, 1)" as 1. The
# expression extractor stays as a fallback: it is what reads "10\%" as a number.
_EXTRACTION = (math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig())

# Tokens that matter for brace matching. "\\" (a LaTeX line break) is consumed first so
# that "\\{" reads as a line break and a group brace; "\{" and "\}" are literal braces.
_BRACE_TOKENS = re.compile(r"\\\\|\\[{}]|\\boxed\s*\{|\{|\}")


@dataclass(frozen=True)
class Verdict:
    """How one response was graded.

    status: "correct"; "wrong" (parsed, not equivalent); "no_box" (no complete, non-empty
    ``\\boxed{}``); "parse_error" (box too long, not math, or sympy raised on it);
    "timeout" (math-verify's alarm or the pool's deadline); "crashed" (the worker died).
    detail: a short reason for the non-obvious statuses, e.g. the sympy exception type.
    """

    status: Status
    detail: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}; expected one of {STATUSES}")

    @property
    def reward(self) -> float:
        return 1.0 if self.status == "correct" else 0.0


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in `text`, or None if there is none.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; escaped braces
    (``\\{1,2\\}``) are content, not grouping. "Last" means the box that closes last, so for
    ``\\boxed{\\boxed{3}}`` the outer box wins. An unterminated box (a response cut off at the
    token limit) is skipped. The space-delimited ``\\boxed 5`` form is not recognised.
    One pass over the text: linear even for 100 kB or thousands of nested braces.
    """
    if not isinstance(text, str):
        raise TypeError(f"last_boxed expects a str, got {type(text).__name__}")
    open_groups: list[int] = []  # per open brace: where its box content starts, or -1
    last: tuple[int, int] | None = None
    for token in _BRACE_TOKENS.finditer(text):
        piece = token.group()
        if piece.startswith("\\boxed"):
            open_groups.append(token.end())
        elif piece == "{":
            open_groups.append(-1)
        elif piece == "}" and open_groups:
            start = open_groups.pop()
            if start >= 0:
                last = (start, token.start())
        # "\\", "\{", "\}" and a stray "}" do not open or close a group
    return None if last is None else text[last[0] : last[1]]


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in `text` (thousands commas dropped), or None."""
    found = _LAST_NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def answer_of(response: str, answer_from: str) -> str | None:
    """What gets graded: the last \\boxed{} (`boxed`, the paper), or with `boxed_or_number`
    the last number when nothing is boxed (small models that never box, e.g. the CPU demo)."""
    box = last_boxed(response)
    if answer_from == "boxed":
        return box
    elif answer_from == "boxed_or_number":
        return box if box is not None and box.strip() else last_number(response)
    else:
        raise ValueError(f"unknown reward.answer_from: {answer_from!r}")


def verify_one(
    response: str, answer: str, *, max_answer_chars: int = 1000, math_timeout_s: int = 5
) -> Verdict:
    """Grade one response against its gold answer, in this process.

    A box longer than `max_answer_chars` is a "parse_error" without calling sympy: real
    answers are a few dozen characters, while the LaTeX parser's time and recursion depth
    grow with the length and nesting of its input, so a long box would stall a worker far
    more often than it would be right. `math_timeout_s` is math-verify's ``signal.alarm``
    per parse/compare call (whole seconds), so this must run on the main thread; use
    `RewardPool` from any other.
    Raises ValueError for a gold answer math-verify cannot read (a dataset bug).
    """
    _check_texts(response, answer)
    box = last_boxed(response)
    early = _verdict_without_sympy(box, max_answer_chars)
    if early is not None:
        return early
    return _judge_box(box, answer, math_timeout_s)


def _check_texts(response: object, answer: object, index: int | None = None) -> None:
    # A None response is a rollout bug (an empty generation is ""), so it raises rather
    # than quietly earning 0.0.
    where = "" if index is None else f" at index {index}"
    if not isinstance(response, str):
        raise TypeError(f"response{where} must be a str, got {type(response).__name__}")
    if not isinstance(answer, str):
        raise TypeError(f"gold answer{where} must be a str, got {type(answer).__name__}")
    if not answer.strip():
        raise ValueError(f"gold answer{where} is empty; drop this problem from the dataset")


def _verdict_without_sympy(box: str | None, max_answer_chars: int) -> Verdict | None:
    if box is None or not box.strip():
        return Verdict("no_box")
    if len(box) > max_answer_chars:
        return Verdict("parse_error", f"box longer than {max_answer_chars} chars")
    return None


@lru_cache(maxsize=4096)
def _parse_gold(answer: str, math_timeout_s: int) -> tuple:
    # Every response in a group shares one gold answer, so parse it once per worker.
    # A timeout raises (and is not cached); any other error is a dataset bug and propagates.
    gold = math_verify.parse(
        f"${answer}$", _EXTRACTION, parsing_timeout=math_timeout_s, raise_on_error=True
    )
    if not gold:
        raise ValueError(
            f"math-verify extracts nothing from gold answer {answer!r} (as LaTeX "
            f"'${answer}$'); fix or drop this problem in the dataset"
        )
    return tuple(gold)


def _judge_box(box: str, answer: str, math_timeout_s: int) -> Verdict:
    if threading.current_thread() is not threading.main_thread():
        # Off the main thread math-verify's alarm raises ValueError, which would be
        # counted as a parse error on every response.
        raise RuntimeError(
            "verify_one uses math-verify's signal.alarm and must run on the main thread; "
            "score from other threads through RewardPool"
        )
    try:
        gold = list(_parse_gold(answer, math_timeout_s))
    except TimeoutException:  # slow machine or odd gold: not the response's fault either way
        return Verdict("timeout", "math-verify alarm on the gold answer")
    try:
        pred = math_verify.parse(
            f"${box}$", _EXTRACTION, parsing_timeout=math_timeout_s, raise_on_error=True
        )
        same = math_verify.verify(gold, pred, timeout_seconds=math_timeout_s, raise_on_error=True)
    except TimeoutException:
        return Verdict("timeout", "math-verify alarm")
    except Exception as err:
        # latex2sympy and sympy raise arbitrary Exception subclasses on malformed or odd
        # math (e.g. NonSquareMatrixError); math-verify's own default catches Exception too.
        # We count them by type. Never str(err): printing a huge expression can hang.
        return Verdict("parse_error", type(err).__name__)
    if same:
        return Verdict("correct")
    if not any(isinstance(p, Basic | MatrixBase) for p in pred):
        return Verdict("parse_error", "no sympy expression in box")
    return Verdict("wrong")


def reward_metrics(verdicts: list[Verdict]) -> dict[str, float]:
    """``reward/mean`` (the reward trained on), ``reward/accuracy`` (the share graded correct:
    the same number while the reward is 1 for correct and 0 otherwise, apart once a reward
    shapes it) and ``reward/<status>_frac`` for every status, over a batch."""
    if not verdicts:
        raise ValueError("reward_metrics needs at least one verdict")
    n = len(verdicts)
    metrics = {"reward/mean": sum(v.reward for v in verdicts) / n,
               "reward/accuracy": sum(v.status == "correct" for v in verdicts) / n}
    for status in STATUSES:
        metrics[f"reward/{status}_frac"] = sum(v.status == status for v in verdicts) / n
    return metrics


# One correct answer of each kind: a broken math-verify install fails loudly at start
# instead of grading everything 0.0, and sympy's first-use cost of each kind (~0.2-0.8 s,
# several seconds on a loaded machine) is paid before a worker's first deadline.
_SELF_CHECK = (
    ("\\frac{1}{2}", "0.5"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\{1,2\\}", "{2,1}"),
    ("[0,1)", "[0, 1)"),
)
_SELF_CHECK_TIMEOUT_S = 60


def _self_check() -> None:
    for box, answer in _SELF_CHECK:
        verdict = _judge_box(box, answer, _SELF_CHECK_TIMEOUT_S)
        if verdict.status != "correct":
            raise RuntimeError(
                f"math-verify self-check graded {box} == {answer} as {verdict}; "
                "check the math-verify and sympy versions"
            )


def _worker_main(conn: Connection, math_timeout_s: int) -> None:
    # Ctrl-C reaches the whole process group, and `ray job stop` / Slurm SIGTERM every process
    # of the job: the parent decides when workers stop, after finishing its step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _self_check()
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
        box, answer = job
        try:
            conn.send(("verdict", _judge_box(box, answer, math_timeout_s)))
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
    an item whose worker dies gets "crashed". Either way the pool keeps working. Workers are
    started with 'spawn' (never fork: the parent runs Ray and vLLM threads), so each one
    re-imports the parent's ``__main__`` module: keep a script's work under
    ``if __name__ == "__main__"``. `score` may be called from any thread; calls are
    serialised. Use as a context manager, or call `close`.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, max_answer_chars: int = 1000,
                 answer_from: str = "boxed"):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        answer_of("", answer_from)  # an unknown value fails here, not at the first batch
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.answer_from = answer_from
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

    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of the current workers (for monitoring)."""
        return [w.process.pid for w in self._workers]

    def score(self, responses: list[str], answers: list[str]) -> list[Verdict]:
        """Grade ``responses[i]`` against gold ``answers[i]``; verdicts in the same order.

        Missing, empty and over-long boxes are graded here without a worker; the rest run
        in parallel on the workers. Raises TypeError for a non-str response or answer,
        ValueError for an empty gold, and RuntimeError if a worker reports an error that
        is not a grading outcome (e.g. a gold answer math-verify cannot read).
        """
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} gold answers")
        verdicts: list[Verdict | None] = [None] * len(responses)
        jobs: deque[tuple[int, str, str]] = deque()
        for i, (response, answer) in enumerate(zip(responses, answers, strict=True)):
            _check_texts(response, answer, index=i)
            box = answer_of(response, self.answer_from)
            verdicts[i] = _verdict_without_sympy(box, self.max_answer_chars)
            if verdicts[i] is None:
                jobs.append((i, box, answer))
        with self._lock:
            if not self._workers:
                raise RuntimeError("RewardPool is closed; create a new one")
            self._run(jobs, verdicts)
        return verdicts

    def _run(self, jobs: deque[tuple[int, str, str]], verdicts: list[Verdict | None]) -> None:
        # Consumes `jobs`; each turn hands one job to every idle worker, then waits for
        # a message or a death from any started/busy worker, unblocked no later than the
        # earliest deadline, when the overdue worker is killed.
        try:
            while jobs or any(w.job is not None for w in self._workers):
                for slot, worker in enumerate(self._workers):
                    if not (jobs and worker.ready and worker.job is None):
                        continue
                    if not worker.process.is_alive():  # died while idle: not the job's fault
                        self._replace(slot)
                        continue
                    index, box, answer = jobs.popleft()
                    try:
                        worker.conn.send((box, answer))
                    except (BrokenPipeError, ConnectionResetError):  # died since is_alive()
                        jobs.appendleft((index, box, answer))
                        self._replace(slot)
                        continue
                    worker.job = index
                    worker.deadline = time.monotonic() + self.timeout_s
                self._wait_and_collect(verdicts)
        finally:
            # After an error, in-flight results would leak into the next call: drop them.
            for slot, worker in enumerate(self._workers):
                if worker.job is not None:
                    self._replace(slot)

    def _wait_and_collect(self, verdicts: list[Verdict | None]) -> None:
        waiting = [(s, w) for s, w in enumerate(self._workers) if not w.ready or w.job is not None]
        if not waiting:
            return
        earliest = min(w.deadline for _, w in waiting)
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
            verdicts[worker.job] = Verdict("crashed", f"exit code {worker.process.exitcode}")
            worker.job = None
        self._replace(slot)

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self.math_timeout_s),
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


def _stop(worker: _Worker) -> None:
    # SIGTERM first; SIGKILL if it is stuck where the default handler cannot run.
    if worker.process.is_alive():
        worker.process.terminate()
        worker.process.join(timeout=1.0)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.conn.close()
