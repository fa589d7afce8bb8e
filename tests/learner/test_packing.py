"""learner.packing: one row of episodes back to back gives the padded path's loss and gradients."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.learner import batching
from tandem.learner.attention import SDPA_VARLEN
from tandem.learner.logprobs import TokenLogprobs, token_logprobs
from tandem.learner.rank import CUDA_ATTENTION
from tandem.loss import grpo_loss


def _episodes(seed: int, count: int = 6) -> tuple[list[Episode], list[float]]:
    """Episodes of different prompt and response lengths, authors switching at random."""
    rng = random.Random(seed)
    episodes, advantages = [], []
    for _ in range(count):
        length = rng.randrange(3, 25)
        authors = [rng.randrange(2) for _ in range(length)]
        episodes.append(Episode(
            prompt_ids=[rng.randrange(10, 900) for _ in range(rng.randrange(2, 14))],
            response_ids=[rng.randrange(10, 900) for _ in range(length)], author_mask=authors,
            logprobs=[-rng.uniform(3, 8) for _ in range(length)]))
        advantages.append(rng.uniform(-1, 1))
    return episodes, advantages


def test_pack_restarts_positions_and_scores_what_the_padded_rows_score():
    long = Episode(prompt_ids=[5, 6, 7], response_ids=[8, 9], author_mask=[1, 0],
                   logprobs=[-1.0, -2.0])
    short = Episode(prompt_ids=[5], response_ids=[4], author_mask=[1], logprobs=[-0.5])
    micro = batching.collate([long, short], [0.5, -0.5], pad_id=0, packed=True)
    packed = micro.packed
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert packed.bounds.tolist() == [0, 5, 7]
    scored = packed.scored[0].bool()
    # the same targets, in the same order, as the padded response mask selects
    assert packed.targets[0][scored].tolist() == micro.targets[micro.response_mask.bool()].tolist()
    assert packed.targets[0][scored].tolist() == [8, 9, 4]
    assert batching.collate([long], [0.5], pad_id=0).packed is None


def test_packed_budget_counts_real_tokens_not_the_padded_rectangle():
    lengths = [50, 10, 10, 10]
    assert batching.split_by_token_budget([0, 1, 2, 3], lengths, 60) == [[0], [1, 2, 3]]
    assert batching.split_by_token_budget([0, 1, 2, 3], lengths, 60, packed=True) == [
        [0, 1], [2, 3]]
    # an episode over the budget still gets a micro-batch of its own
    assert batching.split_by_token_budget([0, 1], [70, 10], 60, packed=True) == [[0], [1]]


def _one_sequence(packed: batching.Packed) -> batching.Packed:
    """The same row read as one long sequence: no restarts, no boundaries."""
    tokens = packed.input_ids.shape[1]
    return batching.Packed(packed.input_ids, torch.arange(tokens)[None], packed.targets,
                           packed.scored, torch.tensor([0, tokens], dtype=torch.int32))


def _loss_and_grads(policy, micro, algorithm):
    policy.zero_grad(set_to_none=True)
    logprobs, _ = token_logprobs(policy, micro, temperature=1.0)
    loss, _ = grpo_loss(logprobs, old_logprobs=logprobs.detach(), advantages=micro.advantages,
                        response_mask=micro.response_mask, author_mask=micro.author_mask,
                        algorithm=algorithm, rollout_logprobs=micro.rollout_logprobs)
    loss.backward()
    return logprobs.detach(), loss.detach(), {
        name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_agg,attention", [("token_mean", SDPA_VARLEN),
                                                ("seq_mean_token_sum", SDPA_VARLEN),
                                                ("token_mean", "sdpa")])
def test_packed_loss_and_gradients_match_padded(tiny_model_dir, loss_agg, attention):
    """The CPU learner's per-episode SDPA (what learner.packing uses), and plain SDPA reading
    the position restarts as a block-diagonal mask."""
    algorithm = compose([f"algorithm.loss_agg={loss_agg}"]).algorithm
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=attention)
    policy = TokenLogprobs(model, chunk_tokens=16)
    episodes, advantages = _episodes(seed=3)
    padded = batching.collate(episodes, advantages, pad_id=0)
    packed = batching.collate(episodes, advantages, pad_id=0, packed=True)
    assert packed.packed.input_ids.shape[1] < padded.input_ids.numel()  # padding was dropped

    logprobs, loss, grads = _loss_and_grads(policy, padded, algorithm)
    packed_logprobs, packed_loss, packed_grads = _loss_and_grads(policy, packed, algorithm)
    assert bool((logprobs != 0).any())
    torch.testing.assert_close(packed_logprobs, logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=0)
    assert grads.keys() == packed_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4)

    # the restarts are what keeps attention within an episode: without them the packed row
    # is one long sequence and the log-probs differ (so the comparison above can fail)
    flat = _one_sequence(packed.packed)
    leaked, _, _ = _loss_and_grads(policy, batching.MicroBatch(
        **{**vars(packed), "packed": flat}), algorithm)
    assert float((leaked - logprobs).abs().max()) > 1e-3


@pytest.mark.gpu
def test_packed_matches_padded_on_cuda_with_the_learners_attention(tiny_model_dir):
    """On a GPU the packed row goes through flash-attn's varlen kernel (when installed; SDPA
    with a block-diagonal mask otherwise), in bf16 as the learner computes there: same
    log-probs as padded rows within bf16 rounding, and different ones without the restarts."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation=CUDA_ATTENTION).to("cuda")
    policy = TokenLogprobs(model, chunk_tokens=16)
    episodes, advantages = _episodes(seed=5, count=8)
    padded = batching.collate(episodes, advantages, pad_id=0)
    packed = batching.collate(episodes, advantages, pad_id=0, packed=True)
    with torch.no_grad():
        expected, _ = token_logprobs(policy, padded, temperature=1.0)
        got, _ = token_logprobs(policy, packed, temperature=1.0)
        flat = _one_sequence(packed.packed)
        leaked, _ = token_logprobs(policy, batching.MicroBatch(**{**vars(packed),
                                                                  "packed": flat}), 1.0)
    scored = padded.response_mask.bool().cuda()
    packed_error = float((got - expected).abs()[scored].mean())
    leak_error = float((leaked - expected).abs()[scored].mean())
    # bf16 rounding differs between the two kernels' orders; a leak is far larger (fp32 CPU:
    # 5e-7 packed against 3.7 nats at most when leaked)
    assert packed_error < 0.1 * leak_error, (packed_error, leak_error)
    torch.testing.assert_close(got, expected, atol=0.05 * float(expected.abs().max()), rtol=0)
