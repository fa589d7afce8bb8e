"""The FSDP2 learner: world sizes agree, checkpoints restore exactly, exports load."""

from __future__ import annotations

import random

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem.config import cpu
from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.learner import batching
from tandem.runtime.learners import Learners

TIMEOUT = 600


def _config(world_size: int, model_dir, **extra):
    overrides = [
        "model@model.senior=tiny", f"model.senior.path={model_dir}",
        "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
        "eval.max_response_tokens=64", "algorithm.group_size=2",
        "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2",
        "trainer.micro_batch_tokens=160", "optim.lr=1e-3", "optim.warmup_steps=2",
        f"cluster.learner.world_size={world_size}", f"cluster.call_timeout_s={TIMEOUT}",
    ]
    return compose(overrides + [f"{k}={v}" for k, v in extra.items()])


def _episodes(seed: int, groups: int = 4, group_size: int = 2) -> tuple[list[Episode], list]:
    rng = random.Random(seed)
    episodes, advantages = [], []
    for group in range(groups):
        prompt = [rng.randrange(10, 900) for _ in range(rng.randrange(5, 12))]
        for _ in range(group_size):
            length = rng.randrange(6, 30)
            author, authors = rng.randrange(2), []
            for _ in range(length):
                if rng.random() < 0.3:
                    author = 1 - author
                authors.append(author)
            episodes.append(Episode(
                prompt_ids=prompt, response_ids=[rng.randrange(10, 900) for _ in range(length)],
                author_mask=authors, logprobs=[-rng.uniform(3, 8) for _ in range(length)],
                group=group,
            ))
            advantages.append(rng.uniform(-1, 1))
    return episodes, advantages


def _trained_state(world_size, model_dir, ray_cluster, steps=1, **extra):
    learners = Learners.start(_config(world_size, model_dir, **extra), str(model_dir))
    try:
        # the synchronous loop's CPU ranks share the machine's cores (Ray reserved one each)
        threads = ray.get([rank.__ray_call__.remote(lambda actor: torch.get_num_threads())
                           for rank in learners.ranks], timeout=TIMEOUT)
        assert threads == [max(1, cpu.usable_cores() // world_size)] * world_size
        metrics = []
        for step in range(steps):
            episodes, advantages = _episodes(seed=step)
            metrics.append(learners.train_step(episodes, advantages))
        state = learners.full_state_dict()
    finally:
        learners.close()
    return state, metrics


def test_plan_gives_every_rank_the_same_number_of_micro_batches():
    lengths = [50, 10, 10, 10, 10, 10, 40]
    plans = batching.plan(lengths, list(range(7)), world_size=2, token_budget=60)
    assert len(plans[0]) == len(plans[1])
    placed = sorted(i for plan in plans for micro in plan for i in micro)
    assert placed == list(range(7))
    for plan in plans:
        for micro in plan:
            assert not micro or max(lengths[i] for i in micro) * len(micro) <= 60 or len(
                micro) == 1


def test_collate_aligns_targets_with_response_tokens_and_authors():
    episode = Episode(prompt_ids=[5, 6, 7], response_ids=[8, 9], author_mask=[1, 0],
                      logprobs=[-1.0, -2.0])
    short = Episode(prompt_ids=[5], response_ids=[4], author_mask=[1], logprobs=[-0.5])
    micro = batching.collate([episode, short], [0.5, -0.5], pad_id=0)
    response = micro.response_mask[0].bool()
    assert micro.targets[0][response].tolist() == [8, 9]
    assert micro.author_mask[0][response].tolist() == [1.0, 0.0]
    assert micro.rollout_logprobs[0][response].tolist() == [-1.0, -2.0]
    assert micro.targets[1][micro.response_mask[1].bool()].tolist() == [4]
    assert micro.attention_mask[1].tolist() == [1, 1, 0, 0, 0]
    assert micro.senior_tokens == 2


@pytest.mark.slow
def test_world_size_two_matches_world_size_one(tiny_model_dir, ray_cluster):
    """Two FSDP ranks on packed micro-batches train exactly as one rank on padded ones: the
    sharding and the layout (learner.packing) each leave the update unchanged."""
    one, metrics_one = _trained_state(1, tiny_model_dir, ray_cluster)
    two, metrics_two = _trained_state(2, tiny_model_dir, ray_cluster,
                                      **{"learner.packing": "true"})
    initial = _load_initial(tiny_model_dir)
    assert one.keys() == two.keys()
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    assert moved > 1e-4, "the step did not change the weights"
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)
    for key in ("train/loss", "train/grad_norm", "train/rollout_logprob_gap_mean"):
        assert metrics_two[-1][key] == pytest.approx(metrics_one[-1][key], rel=1e-4, abs=1e-6)
    assert metrics_one[0]["train/updates"] == 2


def _load_initial(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_checkpoint_round_trip_restores_parameters_and_optimizer(
        tiny_model_dir, ray_cluster, tmp_path):
    learners = Learners.start(_config(2, tiny_model_dir), str(tiny_model_dir))
    try:
        batch_one, batch_two = _episodes(seed=1), _episodes(seed=2)
        learners.train_step(*batch_one)
        saved = learners.full_state_dict()
        learners.save_checkpoint(str(tmp_path / "ckpt"), {"data": 7})
        learners.train_step(*batch_two)
        uninterrupted = learners.full_state_dict()

        extra = learners.load_checkpoint(str(tmp_path / "ckpt"))
        restored = learners.full_state_dict()
        learners.train_step(*batch_two)
        replayed = learners.full_state_dict()
    finally:
        learners.close()
    assert extra == {"data": 7}
    for name in saved:
        assert torch.equal(restored[name], saved[name]), name
        # Same params, Adam moments, step count and LR schedule -> the same next update.
        assert torch.equal(replayed[name], uninterrupted[name]), name
    assert any(not torch.equal(uninterrupted[n], saved[n]) for n in saved)


@pytest.mark.slow
def test_exported_directory_loads_in_transformers_with_the_trained_weights(
        tiny_model_dir, ray_cluster, tmp_path):
    learners = Learners.start(_config(2, tiny_model_dir), str(tiny_model_dir))
    try:
        learners.train_step(*_episodes(seed=3))
        trained = learners.full_state_dict()
        learners.export_hf(str(tmp_path / "hf"))
    finally:
        learners.close()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference.load_state_dict(trained)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer("What is 7 + 5? \\boxed{12}", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, atol=0, rtol=0)
        initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        assert not torch.allclose(exported(ids).logits, initial(ids).logits)


@pytest.mark.slow
def test_kl_entropy_and_junior_options_train_with_a_frozen_reference(tiny_model_dir,
                                                                     ray_cluster):
    config = _config(2, tiny_model_dir, **{
        "algorithm.kl_coef": 0.1, "algorithm.entropy_coef": 0.01,
        "algorithm.junior_kl_coef": 0.05, "trainer.activation_checkpointing": "true"})
    learners = Learners.start(config, str(tiny_model_dir))
    try:
        metrics = learners.train_step(*_episodes(seed=4))
        second = learners.train_step(*_episodes(seed=5))
    finally:
        learners.close()
    # The reference stays at the initial weights while the senior moves away from it.
    assert 0 <= metrics["train/kl_loss"] < second["train/kl_loss"]
    assert metrics["train/junior_kl"] != 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in second.values())
