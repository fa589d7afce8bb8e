"""Reward: last-box extraction, math-verify grading, and a pool that survives bad answers.

Real math-verify and real worker processes throughout; the pools are created once per
module because each spawned worker pays ~2-3 s to import sympy and self-check.
"""

import threading
import time

import pytest

from tandem.reward import (
    STATUSES,
    RewardPool,
    Verdict,
    answer_of,
    last_boxed,
    reward_metrics,
    verify_one,
)

# The thread method: the signal method's SIGALRM would be cancelled by math-verify's alarm.
pytestmark = pytest.mark.timeout(120, method="thread")

TOWER = "\\boxed{9^{9^{9^{9^9}}}}"
POOL_TIMEOUT_S = 5.0  # math-verify alarm 2 s: ordinary cases stay graded on a loaded machine

# (response, gold answer, status): gold strings as DeepScaleR writes them, no "$...$".
CASES = [
    ("so \\boxed{\\frac{1}{2}}.", "0.5", "correct"),
    ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", "correct"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", "correct"),
    ("\\boxed{[0,1)}", "[0, 1)", "correct"),
    ("\\boxed{(0,1]}", "[0, 1)", "wrong"),
    ("\\boxed{[0,1]}", "[0, 1)", "wrong"),
    ("\\boxed{\\{1,2\\}}", "{2, 1}", "correct"),
    ("\\boxed{\\{1,3\\}}", "{2, 1}", "wrong"),
    ("\\boxed{42}", "42", "correct"),
    ("\\boxed{41}", "42", "wrong"),
    ("\\boxed{10\\%}", "10\\%", "correct"),
    ("\\boxed{x=3}", "3", "correct"),
    ("\\boxed{\\boxed{7}}", "7", "correct"),
    # A box is graded whole: no part of it (an inner box, a "$3$", a last number) stands alone.
    ("\\boxed{garbage \\boxed{\\sqrt{9}}}", "3", "wrong"),
    ("\\boxed{\\boxed{\\sqrt{9}}}", "3", "correct"),
    ("\\boxed{1, \\boxed{2}}", "2", "wrong"),
    ("\\boxed{1, \\boxed{2}}", "\\{1, 2\\}", "correct"),
    ("\\boxed{x \\fbox{3}}", "3", "wrong"),
    ("\\boxed{garbage $3$}", "3", "wrong"),
    ("\\boxed{garbage\n\\frac{3}{1}}", "3", "wrong"),
    ("\\boxed{\\garbage 3}", "3", "parse_error"),
    ("\\boxed{3} then \\boxed{wrong \\boxed{4}", "4", "wrong"),
    ("\\fbox{3}", "3", "correct"),
    ("first \\boxed{42}, on reflection \\boxed{41}", "42", "wrong"),
    ("first \\boxed{41}, on reflection \\boxed{42}", "42", "correct"),
    ("\\boxed{42} and then cut off at the token limit: \\boxed{4", "42", "correct"),
    ("The answer is 42.", "42", "no_box"),
    ("\\boxed{ }", "42", "no_box"),
    ("", "42", "no_box"),
    ("\\boxed{x+}", "1", "parse_error"),
    ("\\boxed{" + "x" * 1001 + "}", "1", "parse_error"),
]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=POOL_TIMEOUT_S) as reward_pool:
        yield reward_pool


# --- last_boxed: pure extraction -------------------------------------------------------


def test_last_boxed_matches_nested_and_escaped_braces():
    assert last_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed{\\{1,\\}}") == "\\{1,\\}"  # an escaped brace is content
    assert last_boxed("\\boxed {5}") == "5"


def test_last_boxed_takes_the_last_complete_box():
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\boxed{\\boxed{3}}") == "3"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{2}{") == "1"
    assert last_boxed("stray } and { braces \\boxed{4} }") == "4"


def test_last_boxed_reads_the_last_outermost_box_whole():
    # Inner boxes are part of the answer, their frames dropped: never an answer of their own.
    assert last_boxed("\\boxed{garbage \\boxed{\\sqrt{9}}}") == "garbage \\sqrt{9}"
    assert last_boxed("\\boxed{1} \\boxed{a \\boxed{b} c \\fbox{d \\boxed{e}}}") == "a b c d e"
    assert last_boxed("\\fbox{5}") == "5"  # the same frame, and math-verify reads it as a box
    # A box inside an unterminated box is no answer: the last finished outermost box is.
    assert last_boxed("\\boxed{3} then \\boxed{wrong \\boxed{4}") == "3"
    assert last_boxed("\\boxed{wrong \\boxed{4}") is None


def test_last_boxed_returns_none_without_a_box():
    assert last_boxed("The answer is 42.") is None
    assert last_boxed("\\boxed{" * 5000) is None
    assert last_boxed("\\boxed 5") is None  # the brace-less form is not recognised


def test_last_boxed_handles_deep_nesting_and_long_text():
    deep = "{" * 5000 + "1" + "}" * 5000
    assert last_boxed(f"\\boxed{{{deep}}}") == deep
    assert last_boxed("word " * 20_000 + "\\boxed{42}") == "42"


def test_last_boxed_rejects_non_strings():
    with pytest.raises(TypeError, match="expects a str"):
        last_boxed(None)


# --- verify_one: grading in this process -----------------------------------------------


@pytest.mark.parametrize(("response", "answer", "status"), CASES)
def test_verify_one_grades(response, answer, status):
    verdict = verify_one(response, answer)
    assert verdict.status == status, verdict
    assert verdict.reward == (1.0 if status == "correct" else 0.0)


def test_verify_one_rejects_a_missing_response_or_gold():
    with pytest.raises(TypeError, match="response must be a str, got NoneType"):
        verify_one(None, "42")
    with pytest.raises(ValueError, match="gold answer is empty"):
        verify_one("\\boxed{42}", "  ")


def test_verify_one_refuses_to_run_off_the_main_thread():
    # Off the main thread math-verify's alarm fails; that must not read as a wrong answer.
    errors = []

    def grade():
        try:
            verify_one("\\boxed{42}", "42")
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


# --- RewardPool ------------------------------------------------------------------------


def test_pool_grades_like_verify_one_in_order(pool):
    responses, answers, statuses = zip(*CASES, strict=True)
    verdicts = pool.score(list(responses), list(answers))
    assert [v.status for v in verdicts] == list(statuses)


def test_pool_scores_from_a_non_main_thread(pool):
    results = []
    thread = threading.Thread(
        target=lambda: results.append(pool.score(["\\boxed{\\frac12}", "\\boxed{3}"], ["0.5", "2"]))
    )
    thread.start()
    thread.join()
    assert [v.status for v in results[0]] == ["correct", "wrong"]


def test_pool_returns_on_an_exponent_tower_within_the_deadline(pool):
    start = time.monotonic()
    (verdict,) = pool.score([TOWER], ["5"])
    assert time.monotonic() - start < POOL_TIMEOUT_S + 5
    assert verdict.status in ("timeout", "wrong")


def test_pool_survives_adversarial_responses(pool):
    responses = [
        "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",  # under the length cap, slow to parse
        "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",  # over the cap: never parsed
        "x" * 100_000 + "\\boxed{42}",
        "\\boxed{" * 5000,
    ]
    verdicts = pool.score(responses, ["1", "1", "42", "1"])
    assert verdicts[0].status in ("timeout", "parse_error", "correct")
    assert verdicts[1] == Verdict("parse_error", "box longer than 1000 chars")
    assert verdicts[2].status == "correct"
    assert verdicts[3].status == "no_box"
    assert pool.score(["\\boxed{2}"], ["2"])[0].status == "correct"


def test_pool_validates_inputs(pool):
    with pytest.raises(TypeError, match="response at index 1 must be a str"):
        pool.score(["\\boxed{1}", None], ["1", "1"])
    with pytest.raises(ValueError, match="2 responses but 1 gold answers"):
        pool.score(["a", "b"], ["1"])


def test_pool_raises_on_an_unreadable_gold_and_keeps_working(pool):
    with pytest.raises(RuntimeError, match="extracts nothing from gold answer"):
        pool.score(["\\boxed{1}", "\\boxed{2}"], ["1", "$"])
    assert [v.status for v in pool.score(["\\boxed{1}"], ["1"])] == ["correct"]


# --- metrics ---------------------------------------------------------------------------


def test_reward_metrics_counts_each_status():
    statuses = "correct correct wrong no_box parse_error timeout crashed wrong".split()
    metrics = reward_metrics([Verdict(s) for s in statuses])
    assert metrics["reward/mean"] == metrics["reward/accuracy"] == 2 / 8
    assert metrics["reward/correct_frac"] == 2 / 8
    assert metrics["reward/wrong_frac"] == 2 / 8
    for status in ("no_box", "parse_error", "timeout", "crashed"):
        assert metrics[f"reward/{status}_frac"] == 1 / 8
    assert set(metrics) == {"reward/mean", "reward/accuracy"} | {
        f"reward/{s}_frac" for s in STATUSES}


def test_reward_metrics_and_verdict_reject_bad_input():
    with pytest.raises(ValueError, match="at least one verdict"):
        reward_metrics([])
    with pytest.raises(ValueError, match="unknown verdict status 'right'"):
        Verdict("right")


def test_boxed_or_number_grades_the_last_number_only_when_nothing_is_boxed():
    from tandem.reward import last_number

    assert last_number("Tom has 1,200 apples, then 3.5 and finally -7/2") == "-7/2"
    assert last_number("no digits here") is None
    text = "Step 1: 24 + 4 = 28.\nTherefore, Omar has 23 pencils left."
    assert answer_of(text, "boxed") is None  # the paper's rule: no box, nothing to grade
    assert answer_of(text, "boxed_or_number") == "23"
    assert answer_of(text + " \\boxed{22} then 9", "boxed_or_number") == "22"  # box wins
    with pytest.raises(ValueError, match="reward.answer_from"):
        answer_of(text, "last_line")


def test_pool_with_number_fallback_grades_unboxed_answers(tmp_path):
    with RewardPool(num_workers=1, timeout_s=POOL_TIMEOUT_S, answer_from="boxed_or_number") as pool:
        verdicts = pool.score(["so the answer is 23.", "so it is 22", "no answer"],
                              ["23", "23", "23"])
    assert [v.status for v in verdicts] == ["correct", "wrong", "no_box"]
