"""Overlong episodes: what to do with an episode the shared response budget cut off.

An episode that ran out of budget (`finish_reason == "length"`) has no finished answer, so its
reward of 0 says "too long" more than "wrong", a noisy signal (DAPO, Yu et al. 2025,
arXiv 2503.14476, section 3.4). `algorithm.overlong`:

- `none` (the paper): truncated episodes are trained on like any other.
- `filter` (DAPO's overlong filtering): truncated episodes keep their place in their group's
  advantage (they still count in its mean and std) but get zero weight in the loss: none of
  their tokens is trained on or counted in a denominator (`loss_kept`, read by the learner).
- `soft_penalty` (DAPO's soft overlong punishment, verl's `overlong_buffer`): a length term
  added to every reward, 0 up to L_max - L_cache tokens, then falling linearly to -1 at
  L_max (times `algorithm.overlong_penalty_factor`), where L_max is
  `rollout.max_response_tokens` and L_cache `algorithm.overlong_buffer_tokens`:

      R_length(y) = 0                              if |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                  = -1                             if |y| > L_max

  |y| counts the response in the senior's tokens (both writers' tokens: the shared budget).

Pure functions; the rewards reach `group_advantages` shaped, so dynamic sampling sees them too.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.config.schema import AlgorithmConfig
from tandem.episode import Episode


def soft_penalty(length: int, max_tokens: int, buffer_tokens: int, factor: float = 1.0) -> float:
    """DAPO's length term R_length for a response of `length` tokens (see the module doc)."""
    if buffer_tokens < 1 or buffer_tokens >= max_tokens:
        raise ValueError(f"the overlong buffer must be in [1, {max_tokens}), got {buffer_tokens}")
    start = max_tokens - buffer_tokens
    if length <= start:
        return 0.0
    if length > max_tokens:
        return -factor
    return factor * (start - length) / buffer_tokens


def shaped_rewards(rewards: Sequence[float], episodes: Sequence[Episode],
                   algorithm: AlgorithmConfig, max_tokens: int
                   ) -> tuple[list[float], dict[str, float]]:
    """The rewards advantages are computed from, and `overlong/*` metrics."""
    if len(rewards) != len(episodes):
        raise ValueError(f"{len(rewards)} rewards for {len(episodes)} episodes")
    mode = algorithm.overlong
    truncated = sum(e.truncated for e in episodes) / max(len(episodes), 1)
    if mode == "none":
        return list(rewards), {}
    elif mode == "filter":
        return list(rewards), {"overlong/filtered_frac": truncated}
    elif mode == "soft_penalty":
        penalties = [soft_penalty(len(e.response_ids), max_tokens,
                                  algorithm.overlong_buffer_tokens,
                                  algorithm.overlong_penalty_factor) for e in episodes]
        shaped = [r + p for r, p in zip(rewards, penalties, strict=True)]
        return shaped, {"overlong/penalty_mean": sum(penalties) / max(len(penalties), 1),
                        "overlong/penalized_frac":
                            sum(p < 0 for p in penalties) / max(len(penalties), 1)}
    else:
        raise ValueError(f"unknown algorithm.overlong: {mode!r}")


def loss_kept(episodes: Sequence[Episode], mode: str) -> list[bool]:
    """Per episode: does it take part in the loss? With `filter`, truncated ones do not."""
    if mode in ("none", "soft_penalty"):
        return [True] * len(episodes)
    elif mode == "filter":
        return [not e.truncated for e in episodes]
    else:
        raise ValueError(f"unknown algorithm.overlong: {mode!r}")
