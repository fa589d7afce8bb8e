"""Episodes -> learner tensors: rank shards, token-budget micro-batches, collation.

A micro-batch's loss-side tensors (masks, advantages, rollout log-probs) are always laid out
padded, one row per episode: the loss aggregates per episode. What the model runs on is either
those padded rows or, with `learner.packing`, one row of the episodes back to back (`Packed`):
no compute on padding, and the token budget counts real tokens.

Pure functions. Every learner rank runs the same plan (same episodes, same order), so the
ranks agree on how many micro-batches a mini-batch has without talking to each other — FSDP
needs every rank to run the same number of forward/backward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.episode import Episode


@dataclass
class Packed:
    """A micro-batch's episodes concatenated into one row, for the model's forward.

    Positions restart at 0 with each episode and `bounds` marks where each starts: the
    attention keeps within an episode by them (flash-attn's varlen kernel on GPU, SDPA per
    episode on CPU: tandem.learner.attention; plain SDPA reads the restarts as a
    block-diagonal mask). `scored` selects the response targets in the same order as the padded
    `response_mask` does (episode by episode, position by position), so log-probs computed
    here go back to the padded layout by that mask alone.
    """

    input_ids: torch.Tensor  # [1, tokens]
    position_ids: torch.Tensor  # [1, tokens] 0, 1, ... within each episode
    targets: torch.Tensor  # [1, tokens - 1] the next token; across a boundary, never scored
    scored: torch.Tensor  # [1, tokens - 1] 1 where the target is a response token
    bounds: torch.Tensor  # [episodes + 1] int32: where each episode starts, then the end


@dataclass
class MicroBatch:
    """Right-padded tensors for one forward/backward; targets are input_ids shifted by one."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    targets: torch.Tensor  # [batch, seq - 1]
    response_mask: torch.Tensor  # [batch, seq - 1] 1 where the target is a response token
    author_mask: torch.Tensor  # [batch, seq - 1] 1 where the senior wrote the target
    rollout_logprobs: torch.Tensor  # [batch, seq - 1] the writing engine's log-prob, 0 elsewhere
    advantages: torch.Tensor  # [batch]
    episodes: int
    """Real episodes in the batch; a padding micro-batch (see `plan`) has 0."""
    packed: Packed | None = None
    """The same episodes as one row (learner.packing); None: the model runs on the padded rows."""

    @property
    def senior_tokens(self) -> int:
        return int((self.response_mask * self.author_mask).sum())


def mini_batches(groups: list[int], mini_batch_prompts: int, prompts_per_step: int,
                 kept: list[bool]) -> list[list[int]]:
    """Episode indices of each optimizer update: `groups[i]` is episode i's group, and the
    batch's groups are split into prompts_per_step / mini_batch_prompts updates. Episodes not
    `kept` (`tandem.overlong.loss_kept`) are left out of every update, but their groups still
    count in the split, so the number of updates does not depend on them."""
    ordered = sorted(set(groups))
    per_update = max(1, len(ordered) * mini_batch_prompts // prompts_per_step)
    return [[i for i, group in enumerate(groups) if group in set(ordered[g:g + per_update])
             and kept[i]] for g in range(0, len(ordered), per_update)]


def shard(indices: list[int], lengths: list[int], world_size: int) -> list[list[int]]:
    """Deal episodes to ranks longest-first onto the least-loaded rank (by tokens)."""
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(i)
        loads[rank] += lengths[i]
    return [sorted(s) for s in shards]


def split_by_token_budget(indices: list[int], lengths: list[int], token_budget: int,
                          packed: bool = False) -> list[list[int]]:
    """Micro-batches of episodes, longest first, each one's size within the budget: padded,
    count x longest; `packed`, the sum of the lengths.

    An episode longer than the budget gets a micro-batch of its own rather than an error:
    the budget bounds memory for typical batches, the model's context bounds the rest.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        longest_if_added = max(longest, lengths[i])
        size = total + lengths[i] if packed else longest_if_added * (len(current) + 1)
        if current and size > token_budget:
            groups.append(current)
            current, longest_if_added, total = [], lengths[i], 0
        current.append(i)
        longest = longest_if_added
        total += lengths[i]
    if current:
        groups.append(current)
    return groups


def plan(lengths: list[int], indices: list[int], world_size: int,
         token_budget: int, packed: bool = False) -> list[list[list[int]]]:
    """Per rank, the micro-batches (episode indices) of one mini-batch; `packed`: the budget
    counts real tokens (see `split_by_token_budget`).

    Ranks with fewer micro-batches than the busiest rank get empty ones appended: they run a
    forward/backward with zero loss so the collectives stay matched.
    """
    per_rank = [split_by_token_budget(s, lengths, token_budget, packed)
                for s in shard(indices, lengths, world_size)]
    most = max(len(micro) for micro in per_rank)
    return [micro + [[] for _ in range(most - len(micro))] for micro in per_rank]


def collate(episodes: list[Episode], advantages: list[float], pad_id: int,
            packed: bool = False) -> MicroBatch:
    """Right-pad prompt + response of each episode into one MicroBatch; `packed`: with the
    episodes also concatenated for the forward (`pack`).

    With no episodes (a padding micro-batch) returns one pad token pair with empty masks.
    """
    if not episodes:
        zeros = torch.zeros(1, 1)
        return MicroBatch(
            input_ids=torch.full((1, 2), pad_id, dtype=torch.long),
            attention_mask=torch.ones(1, 2, dtype=torch.long),
            targets=torch.full((1, 1), pad_id, dtype=torch.long),
            response_mask=zeros.clone(), author_mask=zeros.clone(),
            rollout_logprobs=zeros.clone(), advantages=torch.zeros(1), episodes=0,
        )
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    batch = len(episodes)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros(batch, width, dtype=torch.long)  # [batch, seq]
    response_mask = torch.zeros(batch, width - 1)  # [batch, seq - 1]
    author_mask = torch.zeros(batch, width - 1)  # [batch, seq - 1]
    rollout_logprobs = torch.zeros(batch, width - 1)  # [batch, seq - 1]
    for row, episode in enumerate(episodes):
        prompt, response = len(episode.prompt_ids), len(episode.response_ids)
        ids = episode.prompt_ids + episode.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # Target t is input token t + 1: response token j sits at target prompt - 1 + j.
        span = slice(prompt - 1, prompt - 1 + response)
        response_mask[row, span] = 1
        author_mask[row, span] = torch.tensor(episode.author_mask, dtype=torch.float32)
        rollout_logprobs[row, span] = torch.tensor(episode.logprobs, dtype=torch.float32)
    return MicroBatch(
        input_ids=input_ids, attention_mask=attention_mask, targets=input_ids[:, 1:].clone(),
        response_mask=response_mask, author_mask=author_mask,
        rollout_logprobs=rollout_logprobs,
        advantages=torch.tensor(advantages, dtype=torch.float32), episodes=batch,
        packed=pack(episodes) if packed else None,
    )


def pack(episodes: list[Episode]) -> Packed:
    """The episodes' prompt + response back to back in one row (see `Packed`)."""
    ids: list[int] = []
    positions: list[int] = []
    scored: list[int] = []
    bounds = [0]
    for episode in episodes:
        prompt, response = len(episode.prompt_ids), len(episode.response_ids)
        ids += episode.prompt_ids + episode.response_ids
        bounds.append(len(ids))
        positions += range(prompt + response)
        # each episode's prompt + response - 1 targets: its last token's target is the next
        # episode's first token, never scored
        scored += [0] * (prompt - 1) + [1] * response + [0]
    input_ids = torch.tensor([ids], dtype=torch.long)  # [1, tokens]
    return Packed(input_ids=input_ids, position_ids=torch.tensor([positions]),
                  targets=input_ids[:, 1:].clone(),
                  scored=torch.tensor([scored[:-1]], dtype=torch.float32),
                  bounds=torch.tensor(bounds, dtype=torch.int32))
