"""algorithm.overlong: DAPO's soft overlong penalty and overlong filtering."""

from __future__ import annotations

import random
import socket
from dataclasses import replace

import pytest
import torch

from tandem.config.checks import ConfigError
from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.learner.batching import mini_batches
from tandem.overlong import loss_kept, shaped_rewards, soft_penalty


def _episode(length: int, group: int = 0, finish: str = "eos") -> Episode:
    return Episode(prompt_ids=[1], response_ids=[5] * length, author_mask=[1] * length,
                   logprobs=[-1.0] * length, group=group, finish_reason=finish)


# DAPO eq. 13 with L_max = 20, L_cache = 8: 0 up to 12 tokens, then (12 - |y|) / 8, -1 past 20
@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (12, 0.0), (13, -0.125), (16, -0.5), (19, -0.875), (20, -1.0), (21, -1.0),
])
def test_soft_penalty_is_the_dapo_formula(length, expected):
    assert soft_penalty(length, 20, 8) == pytest.approx(expected)
    assert soft_penalty(length, 20, 8, factor=0.5) == pytest.approx(expected / 2)


def test_soft_penalty_refuses_a_buffer_outside_the_budget():
    with pytest.raises(ValueError, match="buffer"):
        soft_penalty(5, 20, 20)


def test_shaped_rewards_per_mode():
    episodes = [_episode(10), _episode(16), _episode(20, finish="length")]
    rewards = [1.0, 1.0, 0.0]
    soft = compose(["algorithm.overlong=soft_penalty", "algorithm.overlong_buffer_tokens=8",
                    "rollout.max_response_tokens=20"])
    shaped, metrics = shaped_rewards(rewards, episodes, soft.algorithm, 20)
    assert shaped == pytest.approx([1.0, 0.5, -1.0])
    assert metrics["overlong/penalized_frac"] == pytest.approx(2 / 3)
    assert metrics["overlong/penalty_mean"] == pytest.approx(-1.5 / 3)
    for mode in ("none", "filter"):
        config = compose([f"algorithm.overlong={mode}"])
        assert shaped_rewards(rewards, episodes, config.algorithm, 20)[0] == rewards
    assert compose([]).algorithm.overlong == "none"  # the paper trains on truncated episodes


def test_config_checks():
    with pytest.raises(ConfigError, match="algorithm.overlong="):
        compose(["algorithm.overlong=cut"])
    with pytest.raises(ConfigError, match="algorithm.overlong_buffer_tokens=64 must be below "
                                          "rollout.max_response_tokens=64"):
        compose(["algorithm.overlong=soft_penalty", "algorithm.overlong_buffer_tokens=64",
                 "rollout.max_response_tokens=64", "eval.max_response_tokens=64"])


def test_filter_takes_truncated_episodes_out_of_every_update_but_keeps_the_update_count():
    # 4 groups of 2, two updates of 2 groups; group 1 is all truncated, group 2 half
    finishes = ["eos", "eos", "length", "length", "eos", "length", "eos", "eos"]
    episodes = [_episode(4, group=i // 2, finish=f) for i, f in enumerate(finishes)]
    groups = [e.group for e in episodes]
    assert loss_kept(episodes, "none") == [True] * 8
    assert loss_kept(episodes, "soft_penalty") == [True] * 8
    kept = loss_kept(episodes, "filter")
    assert kept == [f == "eos" for f in finishes]
    assert mini_batches(groups, 2, 4, [True] * 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mini_batches(groups, 2, 4, kept) == [[0, 1], [4, 6, 7]]
    with pytest.raises(ValueError, match="algorithm.overlong"):
        loss_kept(episodes, "cut")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _learner_step(model_dir, overlong: str, episodes: list[Episode]) -> dict[str, torch.Tensor]:
    from tandem.learner.rank import Learner

    config = compose([
        "model@model.senior=tiny", f"model.senior.path={model_dir}",
        "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
        "eval.max_response_tokens=64", "algorithm.group_size=2", "trainer.prompts_per_step=2",
        "trainer.mini_batch_prompts=2", "trainer.micro_batch_tokens=256", "optim.lr=1e-3",
        f"algorithm.overlong={overlong}"])
    learner = Learner(config, str(model_dir), 0, 1, "127.0.0.1", _free_port())
    try:
        learner.train_step(episodes, [1.0, -1.0, 1.0, -1.0])
        return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
    finally:
        learner.close()


def test_filtered_truncated_episodes_get_zero_weight_in_the_learners_loss(tiny_model_dir):
    """One update with `filter` equals one where the truncated episodes are junior-written
    (zero weight, out of every denominator), and differs from training on them."""
    rng = random.Random(5)

    def episode(group: int, length: int, finish: str, senior: bool = True) -> Episode:
        return Episode(prompt_ids=[rng.randrange(10, 900) for _ in range(6)],
                       response_ids=[rng.randrange(10, 900) for _ in range(length)],
                       author_mask=[int(senior)] * length, logprobs=[-3.0] * length,
                       group=group, finish_reason=finish)

    episodes = [episode(0, 9, "eos"), episode(0, 20, "length"), episode(1, 12, "eos"),
                episode(1, 20, "length")]
    as_junior = [replace(e, author_mask=[0] * len(e.response_ids)) if e.truncated else e
                 for e in episodes]
    filtered = _learner_step(tiny_model_dir, "filter", episodes)
    reference = _learner_step(tiny_model_dir, "none", as_junior)
    unfiltered = _learner_step(tiny_model_dir, "none", episodes)
    moved = 0.0
    for name in filtered:
        torch.testing.assert_close(filtered[name], reference[name], atol=1e-5, rtol=0)
        moved = max(moved, float((filtered[name] - unfiltered[name]).abs().max()))
    assert moved > 1e-4  # the truncated episodes would have moved the weights
