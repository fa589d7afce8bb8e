"""Built-in `reward.fn` plug-ins: (problem, response, gold answer, metadata) -> (reward, verdict).

Each runs in a reward worker process (`RewardPool.score_fn`), on its main thread, under
`reward.timeout_s`. `metadata` holds the episode's facts (`step`, `uid` of the problem, `group`,
`member` (its place in the group), `response_tokens`, `senior_tokens`, `max_response_tokens`,
`finish_reason`; `episode_metadata`) and the run's
grading settings (`answer_from`, `boxes`, `max_answer_chars`, `math_timeout_s`). A verdict that
is a grading status ("correct", "wrong", "no_box", ...) keeps its meaning in `reward/*`
metrics; any other string is counted as "scored".

The format and length terms are examples of shaping on top of the paper's 0/1 answer, kept
small so that a right answer always outscores a wrong one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tandem.reward.answer import answer_of
from tandem.reward.grade import Verdict, judge_box, verdict_without_sympy

if TYPE_CHECKING:
    from tandem.config.schema import TandemConfig
    from tandem.data import Problem
    from tandem.episode import Episode

FORMAT_BONUS = 0.1
"""boxed_answer_and_format: added when the response boxes an answer, right or wrong."""
LENGTH_PENALTY = 0.1
"""boxed_answer_length_penalty: subtracted times the fraction of the response budget used."""


def episode_metadata(episodes: Sequence[Episode], problems: Sequence[Problem], step: int,
                     config: TandemConfig) -> list[dict[str, Any]]:
    """Each episode's facts for `reward.fn` (`episodes[i].group` indexes `problems`): plain
    values, sent to a worker process."""
    size = config.algorithm.group_size
    return [{"step": step, "uid": problems[e.group].uid, "group": e.group, "member": i % size,
             "response_tokens": len(e.response_ids), "senior_tokens": e.senior_tokens,
             "max_response_tokens": config.rollout.max_response_tokens,
             "finish_reason": e.finish_reason} for i, e in enumerate(episodes)]


def graded(response: str, answer: str, metadata: dict[str, Any]) -> Verdict:
    """math-verify's verdict on the response's boxed answer, under the run's grading settings."""
    box = answer_of(response, metadata["answer_from"], metadata["boxes"])
    early = verdict_without_sympy(box, metadata["max_answer_chars"])
    if early is not None:
        return early
    return judge_box(box, answer, metadata["math_timeout_s"])


def boxed_answer(problem: str, response: str, answer: str,
                 metadata: dict[str, Any]) -> tuple[float, str]:
    """The paper's reward: 1.0 when the boxed answer equals the gold (math-verify), else 0.0."""
    verdict = graded(response, answer, metadata)
    return verdict.reward, verdict.status


def boxed_answer_and_format(problem: str, response: str, answer: str,
                            metadata: dict[str, Any]) -> tuple[float, str]:
    """The boxed answer's 0/1 plus FORMAT_BONUS when an answer is boxed at all (the format
    term of DeepSeek-R1-style rewards; TRL's format reward functions)."""
    verdict = graded(response, answer, metadata)
    boxed = verdict.status != "no_box"
    return verdict.reward + FORMAT_BONUS * boxed, verdict.status


def boxed_answer_length_penalty(problem: str, response: str, answer: str,
                                metadata: dict[str, Any]) -> tuple[float, str]:
    """The boxed answer's 0/1 minus LENGTH_PENALTY x the share of the response budget used
    (senior and junior tokens together)."""
    verdict = graded(response, answer, metadata)
    used = metadata["response_tokens"] / metadata["max_response_tokens"]
    return verdict.reward - LENGTH_PENALTY * min(used, 1.0), verdict.status
