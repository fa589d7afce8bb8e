"""Group-relative advantages against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.advantage import STD_EPS, group_advantages
from tandem.config.schema import AlgorithmConfig

REWARDS = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.5, 0.0, 2.0, 1.5]]


def _unbiased_std(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _config(**overrides: object) -> AlgorithmConfig:
    return AlgorithmConfig(group_size=4, **overrides)


def test_mean_std_normalisation_matches_hand_values() -> None:
    advantages, _ = group_advantages(torch.tensor(REWARDS), _config())
    for group, row in zip(REWARDS, advantages.tolist(), strict=True):
        mean = sum(group) / len(group)
        std = _unbiased_std(group)
        assert row == pytest.approx([(r - mean) / (std + STD_EPS) for r in group], abs=1e-6)
    # group 0 by hand: mean 0.5, unbiased std sqrt(1/3), so +-0.5 * sqrt(3)
    assert advantages[0, 0].item() == pytest.approx(0.5 * math.sqrt(3), abs=1e-5)
    assert advantages.sum(dim=1).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


def test_flat_rewards_split_by_group_size_and_keep_their_shape() -> None:
    grouped, _ = group_advantages(torch.tensor(REWARDS), _config())
    flat, _ = group_advantages([r for group in REWARDS for r in group], _config())
    assert flat.shape == (12,)
    assert torch.equal(flat, grouped.reshape(-1))


def test_dr_grpo_skips_the_std() -> None:
    advantages, _ = group_advantages(torch.tensor(REWARDS), _config(scale_by_std=False))
    for group, row in zip(REWARDS, advantages.tolist(), strict=True):
        mean = sum(group) / len(group)
        assert row == pytest.approx([r - mean for r in group], abs=1e-6)
    assert advantages[2].tolist() == pytest.approx([-0.5, -1.0, 1.0, 0.5])


def test_leave_one_out_uses_the_other_members() -> None:
    advantages, _ = group_advantages(
        torch.tensor(REWARDS), _config(baseline="leave_one_out", scale_by_std=False))
    for group, row in zip(REWARDS, advantages.tolist(), strict=True):
        expected = []
        for i, reward in enumerate(group):
            others = [r for j, r in enumerate(group) if j != i]
            expected.append(reward - sum(others) / len(others))
        assert row == pytest.approx(expected, abs=1e-6)
    # group 2, member 2 by hand: 2.0 - (0.5 + 0.0 + 1.5) / 3
    assert advantages[2, 2].item() == pytest.approx(2.0 - 2.0 / 3.0)


def test_leave_one_out_with_std_divides_by_the_group_std() -> None:
    advantages, _ = group_advantages(torch.tensor(REWARDS), _config(baseline="leave_one_out"))
    for group, row in zip(REWARDS, advantages.tolist(), strict=True):
        std = _unbiased_std(group)
        expected = []
        for i, reward in enumerate(group):
            others = [r for j, r in enumerate(group) if j != i]
            expected.append((reward - sum(others) / len(others)) / (std + STD_EPS))
        assert row == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_zero_variance_groups_give_exact_zeros_and_are_counted(
        baseline: str, scale_by_std: bool) -> None:
    rewards = torch.tensor([[1.0] * 4, [0.0] * 4, [0.1] * 4, [1.0, 0.0, 0.0, 0.0], [0.7] * 4])
    advantages, stats = group_advantages(
        rewards, _config(baseline=baseline, scale_by_std=scale_by_std))
    for row in (0, 1, 2, 4):
        assert advantages[row].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert (advantages[3] != 0).all()
    assert stats["train/zero_std_groups"] == 4.0
    assert stats["train/zero_std_frac"] == pytest.approx(0.8)
    assert stats["train/reward_mean"] == pytest.approx(rewards.mean().item())


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), _config())
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(torch.zeros(3, 1), _config())
    config = _config()
    config.baseline = "median"
    with pytest.raises(ValueError, match="unknown baseline: 'median'"):
        group_advantages(torch.zeros(2, 4), config)
