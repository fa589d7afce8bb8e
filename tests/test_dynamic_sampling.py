"""DAPO's dynamic sampling: no-signal groups are dropped and refilled from the prompt stream,
boundedly, and a resumed run draws exactly what an unbroken one would."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem import dynamic_sampling
from tandem.advantage import group_advantages
from tandem.config.checks import ConfigError
from tandem.config.compose import compose
from tandem.data import Problem, PromptStream
from tandem.dynamic_sampling import Scored, merge_metrics, sample, signal_groups
from tandem.episode import Episode
from tandem.prefetch import Prefetch
from tandem.stop import StopRequest

GROUP = 2
PROMPTS = 2


def _config(*overrides: str):
    return compose(["algorithm.dynamic_sampling=true", f"algorithm.group_size={GROUP}",
                    f"trainer.prompts_per_step={PROMPTS}", "trainer.mini_batch_prompts=1",
                    *overrides])


def _episode(group: int) -> Episode:
    return Episode(prompt_ids=[1], response_ids=[2], author_mask=[1], logprobs=[-1.0],
                   group=group)


def _scored(group_rewards: list[list[float]], tag: str) -> Scored:
    """A draw whose group g earns group_rewards[g]; verdicts name the draw and group."""
    episodes, verdicts, rewards = [], [], []
    for g, values in enumerate(group_rewards):
        for value in values:
            episodes.append(_episode(g))
            verdicts.append(f"{tag}{g}")
            rewards.append(value)
    return Scored(episodes, verdicts, rewards, {"time/rollout": 1.0, "reward/mean": 0.5})


def test_signal_groups_is_the_zero_std_test_of_the_advantages():
    rewards = [1.0, 1.0, 0.0, 1.0, 0.3, 0.3, 0.0, -0.0, 1.0, 1.0 + 1e-12]
    assert signal_groups(rewards, 2) == [False, True, False, False, False]
    _, stats = group_advantages(rewards, _config().algorithm)
    assert stats["train/zero_std_groups"] == 4
    with pytest.raises(ValueError, match="groups of 3"):
        signal_groups(rewards, 3)


def test_zero_variance_groups_are_dropped_and_refilled_from_more_draws():
    draws = [[[0, 0], [1, 0]], [[1, 1], [0, 0]], [[0, 1], [1, 0]]]
    asked = []

    def draw(index):
        asked.append(index)
        return _scored(draws[index], f"d{index}g")

    batch = sample(draw, _config())
    assert asked == [0, 1, 2]  # the first two draws held one group with signal in all
    assert batch.verdicts == ["d0g1", "d0g1", "d2g0", "d2g0"]  # the first signal groups
    assert [e.group for e in batch.episodes] == [0, 0, 1, 1]  # relabelled for the learner
    _, stats = group_advantages(batch.rewards, _config().algorithm)
    assert stats["train/zero_std_groups"] == 0
    assert batch.metrics["dynamic/draws"] == 3
    assert batch.metrics["dynamic/signal_groups"] == 3
    assert batch.metrics["dynamic/dropped_groups"] == 3
    assert batch.metrics["dynamic/surplus_groups"] == 1
    assert batch.metrics["dynamic/short_groups"] == 0
    assert batch.metrics["time/rollout"] == 3.0  # every draw's time counts
    assert batch.metrics["reward/mean"] == 0.5


def test_the_draws_are_bounded_and_a_short_batch_is_filled_with_no_signal_groups():
    def draw(index):
        return _scored([[0, 0], [1, 1]] if index else [[0, 1], [1, 1]], f"d{index}g")

    batch = sample(draw, _config("algorithm.dynamic_sampling_max_draws=3"))
    assert batch.metrics["dynamic/draws"] == 3
    assert batch.metrics["dynamic/short_groups"] == 1
    assert batch.verdicts == ["d0g0", "d0g0", "d0g1", "d0g1"]  # the first spare group fills
    assert len({e.group for e in batch.episodes}) == PROMPTS


def test_without_dynamic_sampling_the_first_draw_is_the_batch():
    first = _scored([[0, 0], [1, 1]], "g")
    assert sample(lambda index: first if index == 0 else None,
                  compose(["algorithm.group_size=2"])) is first


def test_merge_metrics_sums_times_and_averages_the_rest():
    merged = merge_metrics([{"time/reward": 1.0, "reward/mean": 0.0, "faults/engine_restarts": 1},
                            {"time/reward": 2.0, "reward/mean": 1.0}])
    assert merged == {"time/reward": 3.0, "reward/mean": 0.5, "faults/engine_restarts": 1.0}


def test_config_checks():
    with pytest.raises(ConfigError, match="algorithm.dynamic_sampling_max_draws"):
        _config("algorithm.dynamic_sampling_max_draws=0")
    assert compose([]).algorithm.dynamic_sampling is False  # off: the paper does not use it


# --- the stream position: extra draws resume exactly ------------------------------------


def _stream() -> PromptStream:
    return PromptStream([Problem(f"p{i}", "", "") for i in range(17)], batch_size=PROMPTS,
                        seed=4)


def _roll(stream: PromptStream, config):
    """The driver's roll, with a reward only even-numbered problems' groups vary in."""
    def roll(step, batch, version):
        def draw(index):
            problems = batch if index == 0 else stream.next_batch()
            signal = [[1.0, 0.0] if int(p.uid[1:]) % 2 == 0 else [0.0, 0.0] for p in problems]
            scored = _scored(signal, "")
            scored.verdicts = [problems[e.group].uid for e in scored.episodes]
            return scored
        return dynamic_sampling.sample(draw, config)
    return roll


def _steps(prefetch: Prefetch, steps: range) -> list[list[str]]:
    trained = []
    for step in steps:
        rolled = prefetch.take(step)
        prefetch.trained(step + 1)
        trained.append(rolled.verdicts[::GROUP])
        assert rolled.metrics["dynamic/short_groups"] == 0
        DRAWS.append(rolled.metrics["dynamic/draws"])
    return trained


DRAWS: list[float] = []


@pytest.mark.parametrize("off_policy", [False, True])
def test_a_resumed_run_draws_the_extra_batches_an_unbroken_run_draws(off_policy):
    config = _config()
    total = 4

    def run(steps: range, position: dict | None = None) -> tuple[list, dict]:
        stream = _stream()
        with ThreadPoolExecutor(1) as background:
            prefetch = Prefetch(_roll(stream, config), lambda version: {}, stream,
                                background if off_policy else None, total, StopRequest())
            if position is not None:
                prefetch.resume(position, steps.start)
            trained = _steps(prefetch, steps)
            prefetch.wait()
            return trained, prefetch.position()  # what a checkpoint after `steps` saves

    DRAWS.clear()
    unbroken, _ = run(range(total))
    assert sum(DRAWS) > total  # some steps drew extra batches
    assert all(int(uid[1:]) % 2 == 0 for step in unbroken for uid in step)
    first, position = run(range(2))
    resumed, _ = run(range(2, total), position)
    assert first + resumed == unbroken
    assert sum(len(step) for step in unbroken) == total * PROMPTS
