"""The Episode record: one co-written response, with the author of every token."""

from __future__ import annotations

from dataclasses import dataclass, field

SENIOR = 1
JUNIOR = 0
ROLE_NAMES = {SENIOR: "senior", JUNIOR: "junior"}
"""The one author convention: ids in masks and dicts, these names in metrics, config and logs."""
HUMAN = 2
"""A person in the junior's seat (`python -m tandem.studio`, co-write). Never an engine role:
training and evaluation episodes hold only SENIOR and JUNIOR."""
AUTHOR_NAMES = {**ROLE_NAMES, HUMAN: "human"}
"""Every author an `author_mask` may hold, by id."""


@dataclass
class Episode:
    """One response to one prompt, written by senior and junior in turns.

    Authorship travels with the token ids from the engines to the loss: nothing downstream
    re-tokenizes text. `logprobs[i]` is the writing engine's log-prob of `response_ids[i]`
    (the senior engine's where `author_mask[i] == SENIOR`, the junior's elsewhere).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    author_mask: list[int]
    """Per response token: 1 senior (SENIOR), 0 junior (JUNIOR), 2 a person (HUMAN, studio)."""
    logprobs: list[float]
    group: int = 0
    """Index of the prompt in its batch; the episodes of one group share a prompt."""
    weight_version: int = 0
    """Senior weight version the senior tokens were sampled under."""
    segment_starts: list[int] = field(default_factory=list)
    """Response index where each segment starts (a new writer took over)."""
    finish_reason: str = "eos"
    """eos (either writer ended it), length (the shared budget ran out) or rounds (an
    evaluation's round cap ended it)."""
    response_text: str = ""

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if len(self.author_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"episode has {n} response tokens but {len(self.author_mask)} authors and "
                f"{len(self.logprobs)} log-probs; the rollout must record one of each per token")

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def senior_tokens(self) -> int:
        return sum(author == SENIOR for author in self.author_mask)
