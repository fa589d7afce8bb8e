"""reward.fn plug-ins and reward.boxes: a plug-in's failures score 0 and are counted, a bad
reward.fn fails at compose time naming the field, and multi-box answers grade together.

The plug-ins the pool runs are this module's functions, imported by name in spawned workers.
"""

import math
import time

import pytest

from tandem.config.checks import ConfigError
from tandem.config.compose import compose
from tandem.reward import (
    RewardPool,
    Verdict,
    answer_of,
    builtin,
    call_fn,
    final_boxes,
    reward_metrics,
)

pytestmark = pytest.mark.timeout(120, method="thread")

PLUGIN = f"{__name__}:picky_reward"
NOT_CALLABLE = 42


def picky_reward(problem, response, answer, metadata):
    """A plug-in whose behaviour the problem text picks."""
    if problem == "raise":
        raise KeyError("no such thing")
    if problem == "hang":
        time.sleep(3600)
    if problem == "bad":
        return "one"
    if problem == "nan":
        return math.nan, "odd"
    if problem == "status":
        return 1.0, "correct"
    return 0.25 + metadata["response_tokens"], f"seen {metadata['answer_from']}"


# --- multi-part answers ------------------------------------------------------------------

MULTI = "So the pairs are \\boxed{(2, 2)} and \\boxed{(6, 2)}."


@pytest.mark.parametrize("text, expected", [
    (MULTI, "(2, 2), (6, 2)"),
    ("$\\boxed{1}$, $\\boxed{2}$", "1, 2"),
    ("try \\boxed{9}\n\nSo \\boxed{3} or \\boxed{4}", "3, 4"),  # earlier paragraphs are out
    ("\\boxed{7}\n  \n\\boxed{\\boxed{8}} and \\boxed{9} then \\boxed{5", "8, 9"),
    ("\\boxed{garbage \\boxed{3}}", "garbage 3"),  # inner boxes stay content
    ("no box here", None),
])
def test_final_boxes_join_the_last_paragraphs_boxes(text, expected):
    assert final_boxes(text) == expected
    assert answer_of(text, "boxed", "final") == expected


def test_the_last_box_rule_stays_the_default():
    assert answer_of(MULTI, "boxed") == "(6, 2)"
    with pytest.raises(ValueError, match="reward.boxes"):
        answer_of(MULTI, "boxed", "all")


@pytest.fixture(scope="module")
def final_pool():
    with RewardPool(num_workers=1, timeout_s=5.0, boxes="final") as pool:
        yield pool


def test_multi_box_answers_grade_together_only_with_boxes_final(final_pool):
    responses = [MULTI, "\\boxed{(6, 2)}, \\boxed{(2, 2)}", "\\boxed{(2, 2)}",
                 "\\boxed{(2, 2)}, \\boxed{(6, 2)} or \\boxed{(1, 1)}", "\\boxed{3} or \\boxed{4}"]
    gold = ["(2, 2), (6, 2)"] * 4 + ["3"]
    got = [v.status for v in final_pool.score(responses, gold)]
    # the hedge (an extra pair, a second candidate) earns nothing
    assert got == ["correct", "correct", "wrong", "wrong", "wrong"]
    with RewardPool(num_workers=1, timeout_s=5.0) as paper:  # the last box alone
        assert [v.status for v in paper.score(responses[:1], gold[:1])] == ["wrong"]


# --- plug-ins ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("tandem.reward.builtin.boxed_answer", "must be package.module:callable"),
    ("tandem.no_such_module:fn", "cannot import 'tandem.no_such_module'"),
    ("tandem.reward.builtin:no_such_fn", "has no 'no_such_fn'"),
    (f"{__name__}:NOT_CALLABLE", "is a int, not a callable"),
])
def test_a_bad_reward_fn_fails_at_compose_time_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match=f"reward.fn={spec!r}.*{message}".replace("(", "\\(")
                       .replace(")", "\\)").replace("[", "\\[")):
        compose([f"reward.fn={spec}"])
    with pytest.raises(ConfigError, match="reward.fn"):
        RewardPool(num_workers=1, fn=spec)


def test_a_good_reward_fn_composes():
    assert compose([f"reward.fn={PLUGIN}"]).reward.fn == PLUGIN
    assert compose([]).reward.fn == "tandem.reward.builtin:boxed_answer"


def test_a_plugin_that_raises_or_hangs_scores_zero_is_counted_and_the_pool_goes_on():
    problems = ["raise", "hang", "bad", "nan", "status", "fine"]
    metadata = [{"response_tokens": 1}] * len(problems)
    with RewardPool(num_workers=1, timeout_s=3.0, fn=PLUGIN) as pool:
        started = time.monotonic()
        verdicts = pool.score_fn(problems, ["r"] * 6, ["1"] * 6, metadata)
        assert time.monotonic() - started < pool.call_budget_s(6)
        assert [v.status for v in verdicts] == ["fn_error", "timeout", "fn_error", "fn_error",
                                                "correct", "scored"]
        assert verdicts[0].detail == "KeyError: 'no such thing'"
        assert [v.reward for v in verdicts] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.25]
        assert verdicts[5].detail == "seen boxed"  # the run's grading settings reach it
        metrics = reward_metrics(verdicts)
        assert metrics["reward/fn_error_frac"] == 3 / 6
        assert metrics["reward/timeout_frac"] == 1 / 6
        assert metrics["reward/mean"] == pytest.approx(2.25 / 6)
        # the worker that hung was replaced; the next call is graded as usual
        assert pool.score_fn(["fine"], ["r"], ["1"], [{"response_tokens": 0}]) == [
            Verdict("scored", "seen boxed", value=0.25)]


SETTINGS = {"answer_from": "boxed", "boxes": "last", "max_answer_chars": 100,
            "math_timeout_s": 5, "max_response_tokens": 100}


@pytest.mark.parametrize("fn, response, tokens, reward, status", [
    (builtin.boxed_answer, "\\boxed{4}", 10, 1.0, "correct"),
    (builtin.boxed_answer, "\\boxed{5}", 10, 0.0, "wrong"),
    (builtin.boxed_answer_and_format, "\\boxed{4}", 10, 1.1, "correct"),
    (builtin.boxed_answer_and_format, "\\boxed{5}", 10, 0.1, "wrong"),
    (builtin.boxed_answer_and_format, "4", 10, 0.0, "no_box"),
    (builtin.boxed_answer_length_penalty, "\\boxed{4}", 50, 0.95, "correct"),
    (builtin.boxed_answer_length_penalty, "\\boxed{5}", 100, -0.1, "wrong"),
])
def test_builtin_plugins(fn, response, tokens, reward, status):
    verdict = call_fn(fn, "2 + 2?", response, "4", {**SETTINGS, "response_tokens": tokens})
    assert verdict.status == status
    assert verdict.reward == pytest.approx(reward)


def test_the_default_fn_is_the_paper_reward_through_score():
    with RewardPool(num_workers=1, timeout_s=5.0,
                    fn="tandem.reward.builtin:boxed_answer") as pool:
        assert pool.fn is None  # the default takes the grading path, no plug-in call
        verdicts = pool.score_fn(["p"] * 3, ["\\boxed{4}", "\\boxed{5}", "4"], ["4"] * 3,
                                 [{}] * 3)
        assert [v.status for v in verdicts] == ["correct", "wrong", "no_box"]
