"""DAPO's dynamic sampling: train only on groups whose rewards differ.

A group whose episodes all earn the same reward has zero advantage everywhere: it costs a
rollout and a learner pass and teaches nothing, and as accuracy rises more groups are all
right, so the effective batch shrinks (DAPO, Yu et al. 2025, arXiv 2503.14476, section 3.2).
With `algorithm.dynamic_sampling` a step keeps the groups with signal, rolls out the next batch
of `trainer.prompts_per_step` prompts while it has fewer than that many, and trains on the
first `prompts_per_step` found; the rest of the last batch is dropped (as verl does). At most
`algorithm.dynamic_sampling_max_draws` batches are drawn; past that the batch is filled up with
no-signal groups (zero advantage, as without dynamic sampling) and `dynamic/short_groups` says
how many. verl's recipe raises there instead; a long run should not die of one hard step.

Signal is judged on the rewards the advantages use (after `algorithm.overlong`'s soft penalty),
so the trained batch has no zero-std group unless it is short. verl's DAPO recipe example filters
on accuracy (`acc`); with a penalty, that can keep a group whose shaped rewards are equal.

Extra batches come from the same prompt stream, drawn by the step's rollout itself: a
checkpoint's stream position is after them, so a resumed run draws what an unbroken run would.
Metrics: `reward/*` and `rollout/*` are over every drawn episode (the policy's accuracy, as
without dynamic sampling); `train/*` over the trained batch.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tandem import overlong
from tandem.config.schema import TandemConfig
from tandem.episode import Episode
from tandem.reward import RewardPool, Verdict, reward_metrics
from tandem.reward.builtin import episode_metadata

if TYPE_CHECKING:  # annotations only: they load torch or Ray
    from tandem.data import Prompts, PromptStream
    from tandem.rollout import Rollout


@dataclass
class Scored:
    """A step's episodes, grouped by prompt (`Episode.group` = index in the batch), with their
    verdicts and the rewards advantages are computed from."""

    episodes: list[Episode]
    verdicts: list[Verdict]
    rewards: list[float]
    metrics: dict[str, float] = field(default_factory=dict)


def signal_groups(rewards: Sequence[float], group_size: int) -> list[bool]:
    """Per group of `group_size` adjacent rewards: do they differ? The exact test
    `group_advantages` makes for a zero-std group, in float32 as it does."""
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    single = array("f", rewards)  # rounded to float32
    return [len(set(single[g:g + group_size])) > 1 for g in range(0, len(single), group_size)]


def sample(draw: Callable[[int], Scored], config: TandemConfig) -> Scored:
    """A step's batch: `draw(0)` as it is, or with `algorithm.dynamic_sampling` the first
    `trainer.prompts_per_step` groups with signal over `draw(0)`, `draw(1)`, ... (see the
    module doc). `draw(i)` rolls out and scores the step's i-th batch of prompts."""
    algorithm = config.algorithm
    if not algorithm.dynamic_sampling:
        return draw(0)
    wanted, size = config.trainer.prompts_per_step, algorithm.group_size
    kept: list[tuple[list[Episode], list[Verdict], list[float]]] = []
    spare: list[tuple[list[Episode], list[Verdict], list[float]]] = []
    drawn: list[Scored] = []
    while len(kept) < wanted and len(drawn) < algorithm.dynamic_sampling_max_draws:
        scored = draw(len(drawn))
        drawn.append(scored)
        for g, signal in enumerate(signal_groups(scored.rewards, size)):
            part = slice(g * size, (g + 1) * size)
            group = (scored.episodes[part], scored.verdicts[part], scored.rewards[part])
            (kept if signal else spare).append(group)
    signalled = len(kept)
    short = max(0, wanted - signalled)
    chosen = kept[:wanted] + spare[:short]
    batch = Scored([], [], [], merge_metrics([s.metrics for s in drawn]))
    for index, (episodes, verdicts, rewards) in enumerate(chosen):
        batch.episodes.extend(replace(e, group=index) for e in episodes)
        batch.verdicts.extend(verdicts)
        batch.rewards.extend(rewards)
    batch.metrics.update({
        "dynamic/draws": float(len(drawn)),
        "dynamic/signal_groups": float(signalled),
        "dynamic/dropped_groups": float(len(spare) - short),  # no signal
        "dynamic/surplus_groups": float(max(0, signalled - wanted)),  # signal, not needed
        "dynamic/short_groups": float(short),
    })
    return batch


def step_roll(config: TandemConfig, prompts: Prompts, stream: PromptStream, rollout: Rollout,
              rewards: RewardPool) -> Callable[[int, list[Any], int], Scored]:
    """What the driver's `Prefetch` calls to roll out a step: episodes of its batch, their reward
    (`reward.fn`, in the pool), shaped by `algorithm.overlong`; with
    `algorithm.dynamic_sampling`, further batches from `stream` until the groups with signal
    fill the step (dynamic_sampling.py)."""
    def roll(step: int, batch: list[Any], weight_version: int) -> Scored:
        def draw(index: int) -> Scored:  # dynamic sampling's extra batches: index > 0
            problems = batch if index == 0 else stream.next_batch()
            ids, junior_ids = prompts.ids(problems)
            episodes, metrics = rollout.generate(
                ids, step, junior_ids, weight_version=weight_version,
                first_index=index * len(ids) * config.algorithm.group_size)
            started = time.perf_counter()
            verdicts = rewards.score_fn([problems[e.group].problem for e in episodes],
                                        [e.response_text for e in episodes],
                                        [problems[e.group].answer for e in episodes],
                                        episode_metadata(episodes, problems, step, config))
            metrics.update(reward_metrics(verdicts))
            metrics["time/reward"] = time.perf_counter() - started
            shaped, shaping = overlong.shaped_rewards([v.reward for v in verdicts], episodes,
                                                      config.algorithm,
                                                      config.rollout.max_response_tokens)
            return Scored(episodes, verdicts, shaped, {**metrics, **shaping})

        return sample(draw, config)

    return roll


def merge_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """One step's metrics over its draws: `time/*` and `faults/*` summed, the rest averaged
    (every draw has as many episodes, so a mean of draws' means is the mean over episodes)."""
    merged: dict[str, float] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row[key] for row in rows if key in row]
        total = sum(values)
        merged[key] = total if key.startswith(("time/", "faults/")) else total / len(values)
    return merged
