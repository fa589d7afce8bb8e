"""One learner rank in this process on four small co-written episodes (two groups): the set-up
the learner tests that compare two configurations of one step share."""

from __future__ import annotations

import random
import socket

from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.learner.rank import Learner

ADVANTAGES = [0.5, -0.5, 1.0, -1.0]


def four_episodes() -> list[Episode]:
    """Prompts of 6 tokens, responses of 11, 17, 9 and 20 tokens with random authors."""
    rng = random.Random(3)
    return [Episode(prompt_ids=[rng.randrange(10, 900) for _ in range(6)],
                    response_ids=[rng.randrange(10, 900) for _ in range(n)],
                    author_mask=[rng.randrange(2) for _ in range(n)],
                    logprobs=[-3.0] * n, group=g)
            for g, n in ((0, 11), (0, 17), (1, 9), (1, 20))]


def single_rank(model_dir, *overrides: str) -> Learner:
    """A world-size-1 learner of the tiny model: two updates a step (one group each), 64-token
    micro-batches; `overrides` on top."""
    config = compose([
        "model@model.senior=tiny", f"model.senior.path={model_dir}",
        "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
        "eval.max_response_tokens=64", "algorithm.group_size=2", "trainer.prompts_per_step=2",
        "trainer.mini_batch_prompts=1", "trainer.micro_batch_tokens=64", *overrides,
    ])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return Learner(config, str(model_dir), 0, 1, "127.0.0.1", port)
