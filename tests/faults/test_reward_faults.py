"""Reward faults injected for real: workers that overrun, die by signal or exit, a call past its
budget, and 1,000 generated adversarial outputs through the pool training uses.

Real math-verify and real worker processes; the test judge (`judge_or_die`) makes a worker
die for real when the box names a way to die.
"""

import ctypes
import os
import random
import resource
import signal
import threading
import time
from collections import Counter

import pytest

from tandem.reward import RewardPool, Verdict, answer_of, reward_metrics
from tandem.reward.grade import judge_box

# The thread method: the signal method's SIGALRM would be cancelled by math-verify's alarm.
pytestmark = pytest.mark.timeout(120, method="thread")

TOWER = "\\boxed{9^{9^{9^{9^9}}}}"
POOL_TIMEOUT_S = 5.0  # math-verify alarm 2 s: ordinary cases stay graded on a loaded machine


def judge_or_die(box: str, answer: str, math_timeout_s: int) -> Verdict:
    """The pool's judge, except that a box naming a way to die kills the worker for real.

    Module level: each spawned worker imports it by name (pytest puts tests/ on sys.path).
    """
    if box.startswith("die:"):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files from the test
    if box == "die:exit":
        os._exit(3)
    elif box == "die:segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as a bug in C code would
    elif box == "die:abort":
        os.abort()  # what GMP does when an allocation for a huge integer fails
    elif box == "die:hang":
        time.sleep(3600)
    return judge_box(box, answer, math_timeout_s)


def _await_exit(pid: int) -> None:
    # Wait for a SIGKILLed worker to exit without reaping it (multiprocessing does that).
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def test_overdue_worker_is_killed_and_replaced():
    # Under 1 s math-verify's own alarm (whole seconds) cannot fire first: the kill does.
    with RewardPool(num_workers=1, timeout_s=0.5) as small:
        (before,) = small.worker_pids
        start = time.monotonic()
        (verdict,) = small.score([TOWER], ["5"])
        assert time.monotonic() - start < 0.5 + 5
        assert verdict == Verdict("timeout", "killed after 0.5 s")
        assert small.worker_pids != [before]
        verdicts = small.score(["\\boxed{\\frac{1}{2}}", "\\boxed{42}"], ["0.5", "41"])
        assert [v.status for v in verdicts] == ["correct", "wrong"]


def test_dead_workers_are_replaced():
    with RewardPool(num_workers=1, timeout_s=4.0) as small:
        # Dies while grading: that item is "crashed", the next one is graded normally.
        (busy,) = small.worker_pids
        threading.Timer(0.3, os.kill, (busy, signal.SIGKILL)).start()
        verdicts = small.score([TOWER, "\\boxed{42}"], ["5", "42"])
        assert [v.status for v in verdicts] == ["crashed", "correct"]

        # Dies while idle (say, the OOM killer): not the next item's fault.
        (idle,) = small.worker_pids
        os.kill(idle, signal.SIGKILL)
        _await_exit(idle)
        assert [v.status for v in small.score(["\\boxed{42}"], ["42"])] == ["correct"]
        pids = small.worker_pids

    with pytest.raises(RuntimeError, match="closed"):
        small.score(["\\boxed{1}"], ["1"])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_that_crash_in_a_row_are_replaced_and_the_batch_goes_on():
    responses = ["\\boxed{die:exit}", "\\boxed{die:segfault}", "\\boxed{die:abort}", "\\boxed{42}",
                 "\\boxed{\\frac{1}{2}}"]
    with RewardPool(num_workers=2, timeout_s=POOL_TIMEOUT_S, judge=judge_or_die) as small:
        first = small.worker_pids
        start = time.monotonic()
        verdicts = small.score(responses, ["42", "42", "42", "42", "0.5"])
        assert time.monotonic() - start < small.call_budget_s(len(responses))
        assert verdicts == [
            Verdict("crashed", "exit code 3"), Verdict("crashed", "killed by SIGSEGV"),
            Verdict("crashed", "killed by SIGABRT"), Verdict("correct"), Verdict("correct")]
        assert reward_metrics(verdicts)["reward/crashed_frac"] == 3 / 5
        assert not set(first) & set(small.worker_pids)  # all replaced, the pool as large
        assert len(small.worker_pids) == 2
        assert [v.status for v in small.score(["\\boxed{7}"] * 3, ["7"] * 3)] == ["correct"] * 3


def test_a_call_stops_at_its_budget_and_scores_the_rest_timeout():
    with RewardPool(num_workers=1, timeout_s=POOL_TIMEOUT_S, judge=judge_or_die) as small:
        start = time.monotonic()
        verdicts = small.score(["\\boxed{die:hang}", "\\boxed{42}", "no box"], ["42"] * 3,
                               budget_s=0.5)
        assert time.monotonic() - start < 0.5 + 5
        over = Verdict("timeout", "reward call over its 0.5 s budget")
        assert verdicts == [over, over, Verdict("no_box")]
        assert small.score(["\\boxed{42}"], ["42"]) == [Verdict("correct")]
        with pytest.raises(ValueError, match="budget_s must be > 0"):
            small.score(["\\boxed{42}"], ["42"], budget_s=0)


# --- fuzz: generated adversarial outputs through the trainer's path ----------------------


@pytest.mark.timeout(300, method="thread")  # 10-30 s on 2 cores shared with other tests
def test_fuzz_adversarial_outputs_all_get_a_verdict_in_bounded_time():
    outputs = adversarial_outputs(seed=13, count=1000)
    texts = [text for _, text in outputs]
    start = time.monotonic()
    for text in texts:  # the pure extraction of both modes, on everything
        answer_of(text, "boxed_or_number")
    assert time.monotonic() - start < 20  # linear scans: a backtracking regex takes minutes
    # math-verify's alarm (1 s) stops most slow items inside the worker, cheaper than a kill
    # and a worker start (~3 s of CPU); the kill at 2.5 s still bounds the rest.
    with RewardPool(num_workers=2, timeout_s=2.5) as fuzz_pool:
        start = time.monotonic()
        verdicts = fuzz_pool.score(texts, ["42"] * len(texts))
        elapsed = time.monotonic() - start
        budget = fuzz_pool.call_budget_s(len(texts))
    statuses = Counter(v.status for v in verdicts)
    stopped = Counter(v.detail for v in verdicts if v.status == "timeout")
    print(f"fuzz: {len(texts)} outputs in {elapsed:.1f} s: {dict(statuses)}; "
          f"timeouts: {dict(stopped)}")
    assert elapsed < budget
    assert all(isinstance(v, Verdict) and v.reward in (0.0, 1.0) for v in verdicts)
    # A timeout is a kill at the item's own deadline (or math-verify's alarm), never the call's.
    assert {v.detail for v in verdicts if v.status == "timeout"} <= {
        "killed after 2.5 s", "math-verify alarm"}
    assert statuses["crashed"] == 0
    for (kind, text), verdict in zip(outputs, verdicts, strict=True):
        if kind == "boxes_in_boxes":
            assert verdict.status != "correct", text
        elif kind == "control":
            assert verdict.status in ("correct", "timeout"), (text, verdict)  # timeout: load
    assert statuses["correct"] >= sum(kind == "control" for kind, _ in outputs) * 0.9


# --- the fuzz generator -----------------------------------------------------------------


def adversarial_outputs(seed: int, count: int) -> list[tuple[str, str]]:
    """`count` (kind, model output) pairs built to break a grader, from a seeded generator.

    The kinds that make sympy run to the deadline (huge numbers, deep nesting under the
    length cap) are drawn rarely: each costs a second of math-verify's alarm, or a kill and a
    worker start (~3 s of CPU) where the alarm cannot interrupt.
    """
    rng = random.Random(seed)
    kinds = list(_MAKERS)
    weights = [_MAKERS[kind][1] for kind in kinds]
    drawn = rng.choices(kinds, weights, k=count)
    return [(kind, _MAKERS[kind][0](rng)) for kind in drawn]


def _prose(rng: random.Random, n: int) -> str:
    words = ["so", "the", "answer", "is", "final", "=", "thus", "$", "\\\\", "42", "\n\n"]
    return " ".join(rng.choice(words) for _ in range(n))


def _nested_braces(rng: random.Random) -> str:
    depth = rng.choice([10, 100, 300, 499, 2000, 20_000])
    opener = rng.choice(["{", "\\left(", "(", "\\frac{1}{", "\\sqrt{", "^{"])
    closer = {"{": "}", "\\left(": "\\right)", "(": ")", "\\frac{1}{": "}", "\\sqrt{": "}",
              "^{": "}"}[opener]
    inner = opener * depth + "1" + closer * depth
    return _prose(rng, 5) + rng.choice(["\\boxed{%s}", "%s", "\\boxed{%s"]) % inner


def _huge_number(rng: random.Random) -> str:
    n = rng.randint(2, 9)
    forms = [
        "10^{10^{10^{10}}}", "10^10^10^10", f"{n}^{{{n}^{{{n}^{{{n}^{n}}}}}}}",
        "9" * rng.choice([50, 400, 999]), f"1e{rng.randint(300, 10**9)}",
        f"({n}^{{{10**rng.randint(3, 12)}}})!", f"{10**rng.randint(3, 8)}!",
        f"\\frac{{1}}{{10^{{-10^{{{n}}}}}}}", f"2^{{2^{{{rng.randint(20, 200)}}}}} \\bmod 7",
        f"\\sum_{{k=1}}^{{10^{{{n * 3}}}}} k", f"\\prod_{{k=1}}^{{10^{{{n}}}}} k",
    ]
    return "so \\boxed{" + rng.choice(forms) + "}"


def _enormous(rng: random.Random) -> str:
    size = rng.choice([1_000, 10_000, 200_000])
    body = rng.choice(["x", "1", "{", "}", "\\", "$", " ", "\\boxed"]) * (size // 5)
    return body + rng.choice(["", "\\boxed{42}", "\\boxed{" + "1" * size + "}"])


def _invalid_latex(rng: random.Random) -> str:
    bad = ["\\frac{1}{}", "\\frac", "\\sqrt[}{}", "\\begin{matrix}", "\\end{pmatrix}", "\\left(",
           "^^^", "_", "\\\\\\", "}{", "&&&", "\\x", "\\text{", "\\mathrm{}}", "#", "%", "~~",
           "\\begin{pmatrix}1&2\\\\3\\end{pmatrix}^{-1}", "\\int", "\\lim", "\\over", "'''",
           "\\frac{\\frac{\\frac{}{}}{}}{}", "1/0", "0^0", "\\log 0", "\\infty-\\infty",
           "x=", "=", "\\{", "\\}", "[", "(]", "\\det", "\\nabla\\cdot", "\\dfrac12\\%\\%"]
    return "\\boxed{" + "".join(rng.choice(bad) for _ in range(rng.randint(1, 6))) + "}"


def _unicode_and_nul(rng: random.Random) -> str:
    pieces = ["\x00", "４２", "٤٢", "\u202e", "\u0301", "😀", "\ufeff", "\ud800", "∞", "√",
              "½", "⁴²", "\u200b", "\\u0000", "\x1b[2J", "\r", "\x7f", "ℵ", "𝟒𝟐"]
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
    return rng.choice(["\\boxed{%s}", "%s", "\\boxed{4%s2}", "%s\\boxed{42}%s"]).replace(
        "%s", text)


def _unterminated(rng: random.Random) -> str:
    return rng.choice(["\\boxed{42", "\\boxed{", "\\boxed{\\frac{1}{2}", "\\boxed{{{{42}"]) * \
        rng.choice([1, 3, 1000]) + rng.choice(["", "}", "}}}}", "\\boxed{"])


def _repeated_boxes(rng: random.Random) -> str:
    box = rng.choice(["\\boxed{42}", "\\boxed{41}", "\\boxed\\boxed{1}", "\\boxed {x}",
                      "\\boxed{}", "\\fbox{1}"])
    return box * rng.choice([2, 100, 10_000])


def _regex_bait(rng: random.Random) -> str:
    n = rng.choice([100, 1000, 10_000])
    bait = ["final answer is " * n, "answer: " + " " * n + "x", "1," * n + "x", "1 " * n + "%x",
            "$" * n, "\\(" * n, "\\[" * n + "]", "-" * n + "1", "1." * n, "=" * n + "1",
            "\\boxed{" + "1 " * (n // 10) + "x}", "\\boxed{" + "1," * (n // 10) + ",%}",
            "\\boxed{" + "\\\\" * n + "}", "a" * n + "\\boxed{" + "a" * n + "!}"]
    return rng.choice(bait)


def _boxes_in_boxes(rng: random.Random) -> str:
    # Garbage around an inner answer that alone would be right: never graded correct.
    inner = rng.choice(["\\boxed{42}", "\\fbox{42}", "$42$", "\\boxed{\\sqrt{1764}}", "42"])
    junk = rng.choice(["garbage", "\\text{no}", "41 +", "\\garbage", "1, 2,", "\\neq"])
    return f"\\boxed{{{junk} {inner}}}"


def _control(rng: random.Random) -> str:
    # Real answers in odd surroundings: the pool must still grade them after all the above.
    return rng.choice(["\\boxed{42}", "so \\boxed{\\frac{84}{2}}.", "\\boxed{42.0}",
                       "x\\boxed{41}y\\boxed{42}"]) + _prose(rng, rng.randint(0, 20))


# kind: (maker, weight)
_MAKERS = {
    "nested_braces": (_nested_braces, 2), "huge_number": (_huge_number, 0.6),
    "enormous": (_enormous, 10), "invalid_latex": (_invalid_latex, 10),
    "unicode_and_nul": (_unicode_and_nul, 10), "unterminated": (_unterminated, 10),
    "repeated_boxes": (_repeated_boxes, 10), "regex_bait": (_regex_bait, 10),
    "boxes_in_boxes": (_boxes_in_boxes, 10), "control": (_control, 10),
}
