"""Chunked log-probs: the same numbers and gradients as the whole-vocabulary computation."""

from __future__ import annotations

import random

import pytest
import torch
from single_rank import ADVANTAGES, four_episodes, single_rank
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GraniteConfig,
    Qwen3Config,
)

from tandem.config.schema import AlgorithmConfig
from tandem.episode import Episode
from tandem.learner import batching
from tandem.learner.logprobs import TokenLogprobs, check_head, token_logprobs
from tandem.loss import grpo_loss

VOCAB = 96
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             max_position_embeddings=128)


def _model(config) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _micro(seed: int = 0, rows: int = 3) -> batching.MicroBatch:
    """Episodes of unequal lengths (padding), both authors, 23 response tokens in all."""
    rng = random.Random(seed)
    lengths = [4, 9, 10][:rows]
    episodes = [Episode(prompt_ids=[rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 6))],
                        response_ids=[rng.randrange(1, VOCAB) for _ in range(n)],
                        author_mask=[rng.randrange(2) for _ in range(n)],
                        logprobs=[-rng.uniform(2, 5) for _ in range(n)])
                for n in lengths]
    return batching.collate(episodes, [0.7, -1.2, 0.4][:rows], pad_id=0)


def _full_vocabulary(model, micro, temperature):
    """What the learner computed before chunking: log_softmax over all logits at once."""
    logits = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
    log_probs = torch.log_softmax(logits[:, :-1].float() / temperature, -1)  # [b, s-1, V]
    chosen = log_probs.gather(-1, micro.targets[..., None]).squeeze(-1)  # [b, s-1]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [b, s-1]
    response = micro.response_mask.bool()
    return torch.where(response, chosen, 0.0), torch.where(response, entropy, 0.0)


@pytest.mark.parametrize("chunk", [1, 5, 23, 4096])  # 23 = all response tokens of _micro
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_logprobs_and_entropy_equal_the_full_vocabulary_ones(chunk, tied):
    model = _model(Qwen3Config(**SHAPE, tie_word_embeddings=tied))
    micro = _micro()
    with torch.no_grad():
        expected = _full_vocabulary(model, micro, temperature=0.6)
        got = token_logprobs(TokenLogprobs(model, chunk), micro, 0.6)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    assert bool((got[0] < 0).sum() == micro.response_mask.sum())  # every response token scored


def _loss_gradients(model, logprobs, entropy, micro, reference):
    algorithm = AlgorithmConfig(entropy_coef=0.05, kl_coef=0.1, junior_token_weight=0.3,
                                junior_kl_coef=0.02)
    model.zero_grad(set_to_none=True)
    loss, _ = grpo_loss(logprobs, old_logprobs=logprobs.detach() + 0.05 * reference,
                        advantages=micro.advantages, response_mask=micro.response_mask,
                        author_mask=micro.author_mask, algorithm=algorithm,
                        rollout_logprobs=micro.rollout_logprobs, ref_logprobs=reference,
                        entropy=entropy, junior_logprobs=micro.rollout_logprobs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [4, 23])  # 23 divides the response tokens, 4 does not
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_gradients_equal_the_full_vocabulary_ones(chunk, tied):
    """Policy gradient, KL to a reference, entropy bonus and junior KL, all through the
    chunked (checkpointed) head: the same gradient on every parameter, head included."""
    model = _model(Qwen3Config(**SHAPE, tie_word_embeddings=tied)).train()
    micro = _micro(seed=1)
    reference = torch.where(micro.response_mask.bool(), -torch.rand(micro.targets.shape) * 4, 0.0)
    expected_loss, expected = _loss_gradients(model, *_full_vocabulary(model, micro, 0.6),
                                              micro, reference)
    policy = TokenLogprobs(model, chunk)
    loss, got = _loss_gradients(model, *token_logprobs(policy, micro, 0.6, entropy="grad"),
                                micro, reference)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4)
    assert float(expected["lm_head.weight" if not tied else "model.embed_tokens.weight"]
                 .abs().max()) > 0


def test_detached_entropy_carries_no_gradient_and_none_skips_it():
    model = _model(Qwen3Config(**SHAPE)).train()
    policy = TokenLogprobs(model, 7)
    logprobs, entropy = token_logprobs(policy, _micro(), 1.0, entropy="detached")
    assert logprobs.requires_grad and not entropy.requires_grad and float(entropy.sum()) > 0
    _, nothing = token_logprobs(policy, _micro(), 1.0, entropy="none")
    assert float(nothing.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="unknown entropy"):
        token_logprobs(policy, _micro(), 1.0, entropy="maybe")


def test_a_micro_batch_without_response_tokens_still_reaches_every_parameter():
    """FSDP ranks pad with empty micro-batches; their backward must run (zero gradients)."""
    model = _model(Qwen3Config(**SHAPE, tie_word_embeddings=False)).train()
    empty = batching.collate([], [], pad_id=0)
    logprobs, entropy = token_logprobs(TokenLogprobs(model, 4), empty, 1.0, entropy="grad")
    assert float(logprobs.detach().abs().sum()) == 0 and float(entropy.detach().abs().sum()) == 0
    (logprobs.sum() + entropy.sum()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert float(parameter.grad.abs().max()) == 0.0, name


def test_softcapped_logits_are_reproduced_and_other_head_scales_refused():
    gemma = _model(Gemma2Config(**SHAPE, final_logit_softcapping=2.0))
    with torch.no_grad():
        gemma.lm_head.weight.mul_(200.0)  # logits well past the cap, so capping matters
    check_head(gemma)  # passes: softcapping is reproduced
    micro = _micro(rows=2)
    policy = TokenLogprobs(gemma, 3)
    with torch.no_grad():
        expected = _full_vocabulary(gemma, micro, temperature=0.7)
        got = token_logprobs(policy, micro, 0.7)
        policy.softcap = None
        uncapped = token_logprobs(policy, micro, 0.7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert float((uncapped[0] - expected[0]).abs().max()) > 0.1

    granite = _model(GraniteConfig(**{k: v for k, v in SHAPE.items() if k != "head_dim"},
                                   logits_scaling=4.0))
    with pytest.raises(ValueError, match="logits_scaling"):
        check_head(granite)


def _trained(model_dir, chunk: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    learner = single_rank(model_dir, "optim.lr=1e-3", "algorithm.entropy_coef=0.01",
                          f"trainer.logprob_chunk_tokens={chunk}")
    try:
        metrics = learner.train_step(four_episodes(), ADVANTAGES)
        return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}, metrics
    finally:
        learner.close()


def test_a_learner_step_does_not_depend_on_the_chunk_size(tiny_model_dir):
    """Two updates (the second with recomputed old log-probs) with 5-token chunks and with
    one chunk per micro-batch: the same weights and metrics."""
    small, small_metrics = _trained(tiny_model_dir, chunk=5)
    whole, whole_metrics = _trained(tiny_model_dir, chunk=4096)
    for name in whole:  # updates move weights ~2e-3; Adam turns fp32 round-off into ~1e-5
        torch.testing.assert_close(small[name], whole[name], atol=5e-5, rtol=0)
    for key in ("train/loss", "train/entropy", "train/grad_norm",
                "train/rollout_logprob_gap_mean"):
        assert small_metrics[key] == pytest.approx(whole_metrics[key], rel=1e-5, abs=1e-7)
    assert whole_metrics["train/updates"] == 2
