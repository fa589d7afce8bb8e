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

Choices made here: the answer is the *last outermost* complete box (brace-balanced; earlier
boxes and unboxed text are ignored; ``\\fbox`` counts as a box), graded whole: the boxes
inside it are content, never answers of their own (`last_boxed`), and math-verify gets the
box as one expression, never a part of it it could match (`grade`). A box longer than
``max_answer_chars`` is a parse error without calling sympy (see `verify_one`).
``reward.boxes=final`` grades the final paragraph's boxes together (`final_boxes`).

Plug-ins: ``reward.fn=package.module:callable`` replaces the training reward with any
(problem, response, gold, metadata) -> (reward, verdict) function, run by the same workers
under the same deadline (`RewardPool.score_fn`, `call_fn`; built-ins in `builtin`).
"""

from tandem.reward.answer import answer_of, final_boxes, last_boxed, last_number
from tandem.reward.grade import (
    STATUSES,
    Status,
    Verdict,
    call_fn,
    gold_error,
    reward_metrics,
    verify_one,
)
from tandem.reward.pool import RewardPool

__all__ = ["STATUSES", "RewardPool", "Status", "Verdict", "answer_of", "call_fn", "final_boxes",
           "gold_error", "last_boxed", "last_number", "reward_metrics", "verify_one"]
