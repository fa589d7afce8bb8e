"""Grading in this process: a `Verdict` for one response, and the batch's ``reward/*`` metrics.

math-verify bounds sympy with ``signal.alarm``, so everything here that calls it must run on a
process's main thread; the trainer goes through `tandem.reward.pool.RewardPool`.
"""

import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import math_verify
from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify.errors import TimeoutException
from math_verify.parser import extract_target_from_pred
from math_verify.utils import timeout
from sympy import Basic, MatrixBase

from tandem.reward.answer import last_boxed

Status = Literal["correct", "wrong", "no_box", "parse_error", "timeout", "crashed", "scored",
                 "fn_error"]
STATUSES: tuple[str, ...] = get_args(Status)

# The gold is parsed as inline LaTeX ("$...$"): unwrapped, the latex extractor finds nothing
# in "0.5" and the expression extractor reads "[0, 1)" as 1. The expression extractor stays
# as a fallback: it is what reads "10\%" as a number.
_EXTRACTION = (math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig())

# A box is graded whole, as one LaTeX expression. math-verify's own search (what `parse`
# does) would grade a part of it: an inner \boxed or \fbox, a "$3$", and after a failed
# parse any later candidate, down to the last number ("\garbage 3" read as 3). So its
# extractor gets one candidate spanning the box (the group name tells it "inline LaTeX"),
# with box extraction off; `self_check` fails loudly if a math-verify release renames these.
_WHOLE_BOX = re.compile(r"\A(?P<first_latexInlineDollar>.+)\Z", re.DOTALL)
_BOX_LATEX = math_verify.LatexExtractionConfig(
    boxed_match_priority=-1,
    normalization_config=NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="none"
    ),
)
# The one case the LaTeX reader misses and the expression reader gets: a plain number,
# maybe with a percent sign ("10\%"). Only a box that is nothing else gets that second try.
_PLAIN_NUMBER = re.compile(r"-?\d[\d,. ]*(?:\\?%)?")  # one way to match: no backtracking


@dataclass(frozen=True)
class Verdict:
    """How one response was graded.

    status: "correct"; "wrong" (parsed, not equivalent); "no_box" (no complete, non-empty
    ``\\boxed{}``); "parse_error" (box too long, not math, or sympy raised on it);
    "timeout" (math-verify's alarm or the pool's deadline); "crashed" (the worker died);
    "scored" (a `reward.fn` plug-in's own verdict, in `detail`); "fn_error" (the plug-in
    raised or returned something else than (reward, verdict); the exception type in `detail`).
    detail: a short reason for the non-obvious statuses, e.g. the sympy exception type.
    value: the reward a `reward.fn` plug-in gave; None: 1.0 for "correct", else 0.0.
    """

    status: Status
    detail: str = ""
    value: float | None = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}; expected one of {STATUSES}")

    @property
    def reward(self) -> float:
        if self.value is not None:
            return self.value
        return 1.0 if self.status == "correct" else 0.0


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
    check_texts(response, answer)
    box = last_boxed(response)
    early = verdict_without_sympy(box, max_answer_chars)
    if early is not None:
        return early
    return judge_box(box, answer, math_timeout_s)


def call_fn(fn: Callable, problem: str, response: str, answer: str,
            metadata: dict) -> Verdict:
    """Run a `reward.fn` plug-in on one response: its (reward, verdict) as a Verdict.

    A verdict that names a grading status keeps it; any other string is "scored", the string
    in `detail`. A plug-in that raises, or returns anything but a finite number and a str,
    scores 0 as "fn_error" (the exception type and the start of its message in `detail`):
    its failures are not ours to foresee, and one bad item must not stop a run. math-verify's
    own alarm inside it counts as "timeout".
    """
    try:
        result = fn(problem, response, answer, metadata)
    except TimeoutException:
        return Verdict("timeout", "math-verify alarm in reward.fn")
    except Exception as err:  # user code: counted per item, never fatal (see docstring)
        return Verdict("fn_error", f"{type(err).__name__}: {str(err)[:200]}", value=0.0)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str)
            and isinstance(result[0], int | float) and math.isfinite(result[0])):
        return Verdict("fn_error", f"returned {type(result).__name__} {str(result)[:80]}, not "
                       "(finite reward, verdict str)", value=0.0)
    reward, verdict = float(result[0]), result[1]
    if verdict in STATUSES and verdict not in ("crashed", "fn_error"):
        return Verdict(verdict, value=reward)
    return Verdict("scored", verdict, value=reward)


def check_texts(response: object, answer: object, index: int | None = None) -> None:
    """Raise on a response or gold answer that is not text, or an empty gold.

    A None response is a rollout bug (an empty generation is ""), so it raises rather
    than quietly earning 0.0.
    """
    where = "" if index is None else f" at index {index}"
    if not isinstance(response, str):
        raise TypeError(f"response{where} must be a str, got {type(response).__name__}")
    if not isinstance(answer, str):
        raise TypeError(f"gold answer{where} must be a str, got {type(answer).__name__}")
    if not answer.strip():
        raise ValueError(f"gold answer{where} is empty; drop this problem from the dataset")


def verdict_without_sympy(box: str | None, max_answer_chars: int) -> Verdict | None:
    """The verdict for a missing, empty or over-long box, or None when sympy must decide."""
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


_PLAIN_GOLD = re.compile(r"-?\d+(?:\.\d+)?")


def gold_error(answer: str, math_timeout_s: int = 5) -> str | None:
    """Why the reward could not grade against this gold answer, or None when it can.

    The data loader calls it on every row, so a gold answer that would stop the run at its
    first episode (an empty one, or one math-verify extracts nothing from) is a skipped,
    reported row instead. Plain numbers, most of every data set, skip sympy. Off the main
    thread math-verify's alarm cannot run, so there the parse is unbounded.
    """
    if not answer.strip():
        return "empty gold answer"
    if _PLAIN_GOLD.fullmatch(answer.strip()):
        return None
    on_main = threading.current_thread() is threading.main_thread()
    try:
        _parse_gold(answer, math_timeout_s if on_main else 0)
    except TimeoutException:
        return f"math-verify timed out on the gold answer {_shown(answer)}"
    except ValueError:  # _parse_gold: nothing extracted
        return f"math-verify extracts nothing from the gold answer {_shown(answer)}"
    except Exception as error:  # latex2sympy raises arbitrary types; the row is skipped
        return (f"math-verify cannot parse the gold answer {_shown(answer)} "
                f"({type(error).__name__})")
    return None


def _shown(answer: str) -> str:
    return repr(answer if len(answer) <= 40 else answer[:37] + "...")


def judge_box(box: str, answer: str, math_timeout_s: int) -> Verdict:
    """Grade a box's content with math-verify; main thread only (its ``signal.alarm``)."""
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
        pred = _parse_box(box, math_timeout_s)
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


def _parse_box(box: str, math_timeout_s: int) -> list:
    # What math_verify.parse does (the same alarm, the string fallback last), on one candidate.
    whole = [([(_WHOLE_BOX, 0)], _BOX_LATEX)]
    pred = timeout(math_timeout_s)(extract_target_from_pred)(box, whole, "first_match")
    parsed = any(isinstance(p, Basic | MatrixBase) for p in pred)
    if not parsed and _PLAIN_NUMBER.fullmatch(box.strip()):
        pred = math_verify.parse(f"${box}$", (math_verify.ExprExtractionConfig(),),
                                 parsing_timeout=math_timeout_s, raise_on_error=True)
    return pred


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


def self_check() -> None:
    """Raise unless this process grades a few known answers correct (run by each worker)."""
    for box, answer in _SELF_CHECK:
        verdict = judge_box(box, answer, _SELF_CHECK_TIMEOUT_S)
        if verdict.status != "correct":
            raise RuntimeError(
                f"math-verify self-check graded {box} == {answer} as {verdict}; "
                "check the math-verify and sympy versions"
            )

