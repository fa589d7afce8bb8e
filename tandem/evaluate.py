"""Validation during training: solo accuracy of the senior and hand-off accuracy of the team.

- solo: the senior alone (handoff_p = 1, senior first) on held-out problems.
- hand-off: senior and frozen junior strictly alternate one reasoning step (`\\n\\n`) each,
  senior first, under one shared budget (the paper's hand-off robustness protocol).

Both use the eval sampling (`eval.temperature`, `top_p`, `top_k`) and `eval.max_response_tokens`,
through the same rollout code as training, and grade with the same reward pool. With
`eval.val_samples` = n > 1, `pass@k` is the unbiased estimator of Chen et al. (2021) for every
k in `eval.pass_k` that is <= n.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tandem.config.schema import TandemConfig
from tandem.engine.api import Sampling
from tandem.estimators import mean_pass_at_k
from tandem.reward import RewardPool
from tandem.rollout import Rollout

VAL_STEP_OFFSET = 1_000_000
"""Validation rollouts use step numbers past any training step, so their episode seeds and
engine session ids never collide with a training step's."""


def protocol_config(config: TandemConfig, protocol: str) -> TandemConfig:
    """The config a validation rollout runs under: eval budget, and who writes what."""
    algorithm = config.algorithm
    if protocol == "solo":
        algorithm = dataclasses.replace(algorithm, name="grpo", handoff_p=1.0,
                                        first_writer="senior")
    elif protocol == "handoff":
        algorithm = dataclasses.replace(algorithm, name="tandem", schedule="alternate",
                                        first_writer="senior")
    else:
        raise ValueError(f"unknown validation protocol: {protocol!r}")
    rollout = dataclasses.replace(config.rollout,
                                  max_response_tokens=config.eval.max_response_tokens)
    return dataclasses.replace(config, algorithm=algorithm, rollout=rollout)


def validation_rollouts(config: TandemConfig, senior: list[Any], junior: list[Any],
                        senior_tokenizer: Any, junior_tokenizer: Any | None
                        ) -> dict[str, Rollout]:
    """One `Rollout` per validation protocol (solo, and hand-off when eval.val_handoff)."""
    protocols = ["solo"] + (["handoff"] if config.eval.val_handoff else [])
    sampling = Sampling(temperature=config.eval.temperature, top_p=config.eval.top_p,
                        top_k=config.eval.top_k)
    return {protocol: Rollout(protocol_config(config, protocol), senior, junior,
                              senior_tokenizer, junior_tokenizer, sampling=sampling)
            for protocol in protocols}


def validate(rollouts: dict[str, Rollout], prompts: list[list[int]],
             junior_prompts: list[list[int]] | None, answers: list[str], rewards: RewardPool,
             step: int, samples: int, pass_k: list[int], weight_version: int
             ) -> dict[str, float]:
    """`val/<protocol>_accuracy` (mean reward), `val/<protocol>_pass@k` and response lengths.
    `weight_version`: the version the senior engines serve now."""
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    for protocol, rollout in rollouts.items():
        episodes, stats = rollout.generate(prompts, VAL_STEP_OFFSET + step, junior_prompts,
                                           samples=samples, weight_version=weight_version)
        verdicts = rewards.score([e.response_text for e in episodes],
                                 [answers[e.group] for e in episodes])
        correct = [0] * len(prompts)
        for episode, verdict in zip(episodes, verdicts, strict=True):
            correct[episode.group] += verdict.reward == 1.0
        metrics[f"val/{protocol}_accuracy"] = sum(correct) / (samples * len(prompts))
        for k in pass_k:
            if k <= samples and k > 1:
                metrics[f"val/{protocol}_pass@{k}"] = mean_pass_at_k(correct, samples, k)
        metrics[f"val/{protocol}_response_tokens"] = stats["rollout/response_tokens_mean"]
        if protocol == "handoff":
            metrics["val/handoff_senior_token_frac"] = stats["tandem/senior_token_frac"]
    metrics["time/val"] = time.perf_counter() - started
    return metrics
