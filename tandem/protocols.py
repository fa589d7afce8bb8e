"""The paper's evaluation protocols, run on the training engines and scheduler.

Generation protocols (each a `Protocol`: who writes which segment of an evaluation episode):

- `solo`: the senior alone.
- `handoff`: hand-off robustness. Senior and frozen junior strictly alternate one reasoning step
  (a `\\n\\n`-ended segment) each, senior first, under one shared token budget, for at most
  `eval.max_rounds` rounds (a round is one turn of each writer). `handoff_junior_first`: the
  same with the junior first.
- `handoff_word`: a Bernoulli hand-off at every word boundary, the senior writing each word
  with probability `eval.word_p` (the first writer drawn too), as in training.
- `dose/<p>`: a Bernoulli hand-off at every step, the senior writing each step with probability
  p (the first writer drawn too): p = 1 is the senior alone, p = 0 the junior alone.

Every episode of a prompt of P tokens gets min(`eval.max_response_tokens`, context - P - 8)
response tokens, shared by both writers, where context is `eval.context_tokens` (the paper:
min(3000, 4096 - P - 8)). The team's answer is graded by the training reward pool.

Scores on the senior's solo chains, teacher-forced from the engines' `score` (prompt log-probs
at temperature 1, after the chat prompt the chain was written to; the end-of-turn token is not
scored, as the reference scores the decoded text):

- legibility: the junior's cross-entropy per token of a chain (nats), -sum log p_junior / its
  tokens. Lower = the junior reads the senior's reasoning more easily.
- drift: (sum log p_senior - sum log p_junior) / the chain's senior tokens. On the senior's own
  samples its mean estimates KL(senior || junior) per token (exactly so at temperature 1).

A junior with another tokenizer reads the chain's text re-encoded in its own tokens; a junior
with the senior's vocabulary reads the token ids as the senior wrote them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tandem.config.schema import TandemConfig
from tandem.data import Problem, format_prompt
from tandem.engine.api import Sampling
from tandem.episode import Episode
from tandem.reward import RewardPool
from tandem.rollout import Rollout, call_engine

CONTEXT_RESERVE = 8
"""Tokens of the context left free after prompt + budget (the reference's reserve)."""


@dataclass(frozen=True)
class Protocol:
    """Who writes an evaluation episode: an alternation schedule for `Rollout`."""

    name: str
    schedule: str
    handoff_p: float
    """Probability that the senior writes the next segment (strict alternation ignores it)."""
    first_writer: str
    round_cap: bool = False
    """Strict alternation: end after `eval.max_rounds` rounds."""


def dose_name(p: float) -> str:
    """The protocol name of one dose point: `dose/0.75`."""
    return f"dose/{float(p)}"


def protocol(name: str, config: TandemConfig) -> Protocol:
    """The protocol called `name` (solo, handoff, handoff_junior_first, handoff_word, dose/<p>)."""
    if name == "solo":
        return Protocol(name, "step", 1.0, "senior")
    elif name == "handoff":
        return Protocol(name, "alternate", 0.5, "senior", round_cap=True)
    elif name == "handoff_junior_first":
        return Protocol(name, "alternate", 0.5, "junior", round_cap=True)
    elif name == "handoff_word":
        return Protocol(name, "word", config.eval.word_p, "random")
    elif name.startswith("dose/"):
        return Protocol(name, "step", float(name.removeprefix("dose/")), "random")
    else:
        raise ValueError(f"unknown validation protocol: {name!r}; use solo, handoff, "
                         "handoff_junior_first, handoff_word or dose/<p>")


def generation_protocols(config: TandemConfig) -> list[str]:
    """The generation protocols `eval.protocols` asks for, `dose` expanded to its points."""
    names: list[str] = []
    for name in config.eval.protocols:
        if name == "dose":
            names += [dose_name(p) for p in config.eval.dose_p]
        elif name not in ("legibility", "drift"):
            names.append(name)
    return list(dict.fromkeys(names))


def protocol_config(config: TandemConfig, name: str) -> TandemConfig:
    """The config an episode of protocol `name` runs under: its writers, the eval budget."""
    chosen = protocol(name, config)
    solo = chosen.handoff_p == 1.0 and chosen.first_writer == "senior"
    algorithm = dataclasses.replace(config.algorithm, name="grpo" if solo else "tandem",
                                    schedule=chosen.schedule, handoff_p=chosen.handoff_p,
                                    first_writer=chosen.first_writer)
    rollout = dataclasses.replace(config.rollout,
                                  max_response_tokens=config.eval.max_response_tokens)
    return dataclasses.replace(config, algorithm=algorithm, rollout=rollout)


def eval_context(config: TandemConfig) -> int:
    """The context window evaluation budgets fit: `eval.context_tokens`, else room for the
    longest training prompt plus the whole eval budget."""
    return config.eval.context_tokens or (config.rollout.max_prompt_tokens
                                          + config.eval.max_response_tokens)


def response_budget(prompt_tokens: int, config: TandemConfig) -> int:
    """The shared response budget of a prompt: min(max_response_tokens, context - P - 8)."""
    return min(config.eval.max_response_tokens,
               eval_context(config) - prompt_tokens - CONTEXT_RESERVE)


def eval_sampling(config: TandemConfig) -> Sampling:
    return Sampling(temperature=config.eval.temperature, top_p=config.eval.top_p,
                    top_k=config.eval.top_k)


@dataclass
class PromptSet:
    """Problems with their chat prompts in each engine's tokens and their response budgets."""

    problems: list[Problem]
    senior: list[list[int]]
    junior: list[list[int]] | None
    """None when the junior shares the senior's tokenizer."""
    budgets: list[int]

    def select(self, indices: list[int]) -> PromptSet:
        return PromptSet([self.problems[i] for i in indices], [self.senior[i] for i in indices],
                       None if self.junior is None else [self.junior[i] for i in indices],
                       [self.budgets[i] for i in indices])


@dataclass
class Team:
    """The engines an evaluation runs on, their tokenizers, and one `Rollout` per protocol.

    `senior` / `junior`: engine replicas (Ray actor handles of `RolloutEngine`, or the plain
    objects); `junior_tokenizer` None when the junior shares the senior's vocabulary."""

    config: TandemConfig
    senior: list[Any]
    junior: list[Any]
    senior_tokenizer: Any
    junior_tokenizer: Any | None = None
    _rollouts: dict[str, Rollout] = field(default_factory=dict)

    def rollout(self, name: str) -> Rollout:
        if name not in self._rollouts:
            chosen = protocol(name, self.config)
            cap = 2 * self.config.eval.max_rounds if chosen.round_cap else None
            self._rollouts[name] = Rollout(
                protocol_config(self.config, name), self.senior, self.junior,
                self.senior_tokenizer, self.junior_tokenizer, sampling=eval_sampling(self.config),
                max_segments=cap)
        return self._rollouts[name]

    def prompts(self, problems: list[Problem], instruction: str) -> tuple[PromptSet, list[str]]:
        """Chat prompts and budgets; problems whose prompt leaves no budget are dropped (their
        uids returned)."""
        senior = [format_prompt(self.senior_tokenizer, p.problem, instruction) for p in problems]
        junior = None
        if self.junior_tokenizer is not None:
            junior = [format_prompt(self.junior_tokenizer, p.problem, instruction)
                      for p in problems]
        budgets = [response_budget(max(len(s), len(junior[i]) if junior else 0), self.config)
                   for i, s in enumerate(senior)]
        kept = [i for i, budget in enumerate(budgets) if budget >= 1]
        dropped = [p.uid for i, p in enumerate(problems) if budgets[i] < 1]
        return PromptSet(problems, senior, junior, budgets).select(kept), dropped


async def generate(team: Team, name: str, prompts: PromptSet, rewards: RewardPool, step: int,
                   samples: int, weight_version: int = 0
                   ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """`samples` graded episodes per problem under protocol `name`: one record per problem
    (uid, correct, and each sample's text, reward, finish reason, tokens and senior share; solo
    samples also keep their token ids for scoring) and the rollout's metrics."""
    episodes, stats = await team.rollout(name).agenerate(
        prompts.senior, step, prompts.junior, samples=samples, weight_version=weight_version,
        budgets=prompts.budgets)
    answers = [prompts.problems[e.group].answer for e in episodes]
    # the pool blocks while it grades: off the event loop, where other protocols' turns run
    verdicts = await asyncio.to_thread(rewards.score, [e.response_text for e in episodes],
                                       answers)
    records = [{"uid": p.uid, "correct": 0, "samples": []} for p in prompts.problems]
    for episode, verdict in zip(episodes, verdicts, strict=True):
        record = records[episode.group]
        record["correct"] += int(verdict.reward == 1.0)
        record["samples"].append(_sample(episode, verdict.reward, keep_ids=name == "solo"))
    return records, stats


def _sample(episode: Episode, reward: float, keep_ids: bool) -> dict[str, Any]:
    sample = {"text": episode.response_text, "reward": reward, "finish": episode.finish_reason,
              "tokens": len(episode.response_ids),
              "senior_frac": episode.senior_tokens / max(len(episode.response_ids), 1)}
    if keep_ids:
        sample["response_ids"] = episode.response_ids
    return sample


async def score_chains(team: Team, prompts: PromptSet, solo: list[dict[str, Any]],
                       drift: bool) -> list[dict[str, Any]]:
    """Legibility (and drift, if asked) of each problem's solo chains: one record per problem
    with, per scored chain, the junior's cross-entropy (`junior_ce`, nats per token), the
    junior's token count (`tokens`) and, with `drift`, the senior - junior log-prob gap per
    senior token (`logprob_gap`). Chains with no text are skipped; `samples` holds the index in
    the solo record of each chain scored, in order."""
    special = set(team.senior_tokenizer.all_special_ids)
    records = []
    calls = []
    for index, (problem, record) in enumerate(zip(prompts.problems, solo, strict=True)):
        senior_seqs, junior_seqs, starts, scored = [], [], [], []
        for number, sample in enumerate(record["samples"]):
            ids = list(sample["response_ids"])
            while ids and ids[-1] in special:  # the end-of-turn token is no text
                ids.pop()
            if team.junior_tokenizer is None:
                junior_prompt, junior_ids = prompts.senior[index], ids
            else:
                junior_prompt = prompts.junior[index]
                junior_ids = team.junior_tokenizer.encode(sample["text"], add_special_tokens=False)
            if not ids or not junior_ids:
                continue
            senior_seqs.append(prompts.senior[index] + ids)
            junior_seqs.append(junior_prompt + junior_ids)
            starts.append(len(junior_prompt))
            scored.append(number)
        records.append({"uid": problem.uid, "samples": scored, "senior_tokens": [
            len(s) - len(prompts.senior[index]) for s in senior_seqs]})
        junior = team.junior[index % len(team.junior)]
        senior = team.senior[index % len(team.senior)]
        calls.append(_score(junior, junior_seqs, starts, team.config))
        calls.append(_score(senior, senior_seqs, [len(prompts.senior[index])] * len(senior_seqs),
                            team.config) if drift else _nothing())
    scores = await asyncio.gather(*calls)
    for record, junior, senior in zip(records, scores[0::2], scores[1::2], strict=True):
        record["tokens"] = [len(values) for values in junior]
        record["junior_ce"] = [-sum(values) / len(values) for values in junior]
        if drift:
            record["logprob_gap"] = [(sum(s) - sum(j)) / len(s)
                                     for s, j in zip(senior, junior, strict=True)]
    return records


async def _score(engine: Any, sequences: list[list[int]], starts: list[int],
                 config: TandemConfig) -> list[list[float]]:
    if not sequences:
        return []
    return await call_engine(engine, "score", sequences, starts,
                             timeout_s=config.cluster.call_timeout_s)


async def _nothing() -> list[list[float]]:
    return []
