"""Group-relative advantages for GRPO: every episode is scored against its own group.

- `baseline="mean"` (GRPO, Shao et al. 2024, "DeepSeekMath"): reward minus the group mean.
- `baseline="leave_one_out"` (RLOO, Ahmadian et al. 2024, "Back to Basics"): reward minus the
  mean of the *other* group members, which equals G / (G - 1) times the mean-baseline value.
- `scale_by_std=True` (GRPO) divides by the group std + eps, whichever the baseline;
  `False` is Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), which drops the
  std because it up-weights groups that are nearly all right or all wrong.

The std is the *unbiased* one (Bessel's correction, `torch.std`'s default), as in verl and TRL,
so values match those frameworks. A group whose rewards are all equal carries no signal: its
advantages are set to exactly 0 (not 0 / eps) and the group is counted in
`train/zero_std_groups`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.config.schema import AlgorithmConfig

STD_EPS = 1e-6
"""Added to the group std before dividing (verl's value)."""


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    algorithm: AlgorithmConfig,
    eps: float = STD_EPS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages with the shape of `rewards`, and group statistics for logging.

    `rewards` is [num_groups, group_size], or flat [num_groups * group_size] with the members of
    a group adjacent; flat rewards are split into rows of `algorithm.group_size`.
    """
    flat = torch.as_tensor(rewards, dtype=torch.float32)
    if flat.dim() == 1:
        if flat.numel() % algorithm.group_size != 0:
            raise ValueError(f"{flat.numel()} rewards do not split into groups of "
                             f"algorithm.group_size={algorithm.group_size}")
        grouped = flat.view(-1, algorithm.group_size)  # [groups, group_size]
    elif flat.dim() == 2:
        grouped = flat  # [groups, group_size]
    else:
        raise ValueError(f"rewards must be [groups, group_size] or flat, got {tuple(flat.shape)}")
    size = grouped.shape[1]
    if size < 2:
        raise ValueError(f"a group needs >= 2 episodes to compare, got group_size={size}")

    mean = grouped.mean(dim=1, keepdim=True)  # [groups, 1]
    if algorithm.baseline == "mean":
        baseline = mean  # [groups, 1]
    elif algorithm.baseline == "leave_one_out":
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (size - 1)  # [groups, size]
    else:
        raise ValueError(f"unknown baseline: {algorithm.baseline!r}")
    advantages = grouped - baseline  # [groups, group_size]
    std = grouped.std(dim=1, keepdim=True)  # [groups, 1], unbiased
    if algorithm.scale_by_std:
        advantages = advantages / (std + eps)  # [groups, group_size]

    # Exact test, not std < tol: a float mean of equal values can differ from them by an ulp.
    zero_std = (grouped == grouped[:, :1]).all(dim=1)  # [groups]
    advantages = torch.where(zero_std[:, None], 0.0, advantages)  # [groups, group_size]
    stats = {
        "train/reward_mean": grouped.mean().item(),
        "train/reward_group_std": std.mean().item(),
        "train/zero_std_groups": float(zero_std.sum().item()),
        "train/zero_std_frac": zero_std.float().mean().item(),
    }
    return advantages.reshape(flat.shape), stats
