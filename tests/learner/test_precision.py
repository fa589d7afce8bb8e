"""learner.cpu_compute_dtype: bf16 compute on CPU moves the loss and log-probs a little, not at
all in fp32, and is refused on CPUs without bf16 units."""

from __future__ import annotations

import random

import pytest
import torch
from single_rank import ADVANTAGES, four_episodes, single_rank
from transformers import AutoModelForCausalLM

from tandem.config import cpu
from tandem.config.checks import ConfigError
from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.learner import batching, precision
from tandem.learner.logprobs import TokenLogprobs, token_logprobs
from tandem.learner.rank import Learner
from tandem.loss import grpo_loss

# /proc/cpuinfo flags (abridged) of the machines these sessions get
ZEN1 = "fpu sse sse2 avx fma avx2 sha_ni"  # AMD EPYC 7xx1: no AVX-512
ZEN4 = "avx2 avx512f avx512bw avx512_bf16 avx512_vnni"  # AMD EPYC 9xx4
SAPPHIRE_RAPIDS = "avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"  # Intel Xeon 4th gen
GRAVITON3 = "fp asimd sve bf16 i8mm"  # aarch64 Features line

# bf16 keeps 8 bits of mantissa (~0.4% a value); through two layers, a 1024-way head and
# temperature 0.6 the tiny model's per-token log-probs moved 0.06 nats at most (mean 0.02)
# and the loss 0.004 when this was written: the bounds leave room for another CPU's kernels.
LOGPROB_ATOL = 0.15
LOGPROB_MEAN_ATOL = 0.04
LOSS_ATOL = 0.02


@pytest.mark.parametrize(("flags", "fast"), [
    (ZEN1, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True), ("", False)])
def test_bf16_units_are_read_from_the_cpu_flags(flags, fast):
    assert cpu.has_bf16_units(flags) is fast


def test_bf16_is_refused_without_bf16_units_naming_the_setting_to_use():
    assert precision.compute_dtype("bfloat16", "cpu", SAPPHIRE_RAPIDS) is torch.bfloat16
    assert precision.compute_dtype("float32", "cpu", ZEN1) is None
    assert precision.compute_dtype("bfloat16", "cuda", ZEN1) is None  # GPU: FSDP's policy
    with pytest.raises(ConfigError, match="learner.cpu_compute_dtype=float32"):
        precision.compute_dtype("bfloat16", "cpu", ZEN1)


def test_cpu_flags_reads_the_x86_or_aarch64_line(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {ZEN4}\n\n"
                   f"processor\t: 1\nflags\t\t: {ZEN4}\n")
    arm.write_text(f"processor\t: 0\nFeatures\t: {GRAVITON3}\n")
    assert cpu.cpu_flags(str(x86)) == ZEN4
    assert cpu.cpu_flags(str(arm)) == GRAVITON3
    assert cpu.cpu_flags(str(tmp_path / "missing")) == ""


def test_learner_refuses_bf16_at_start_on_a_cpu_without_bf16_units(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: ZEN1)
    config = compose(["model@model.senior=tiny", f"model.senior.path={tiny_model_dir}",
                      "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
                      "eval.max_response_tokens=64", "learner.cpu_compute_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="no bf16 matmul units"):
        Learner(config, str(tiny_model_dir), rank=0, world_size=1, master_addr="127.0.0.1",
                master_port=1)


def _micro_batch() -> batching.MicroBatch:
    rng = random.Random(5)
    episodes, advantages = [], []
    for _ in range(4):
        length = rng.randrange(8, 24)
        episodes.append(Episode(
            prompt_ids=[rng.randrange(10, 900) for _ in range(rng.randrange(3, 10))],
            response_ids=[rng.randrange(10, 900) for _ in range(length)],
            author_mask=[rng.randrange(2) for _ in range(length)],
            logprobs=[-rng.uniform(3, 8) for _ in range(length)]))
        advantages.append(rng.uniform(-1, 1))
    return batching.collate(episodes, advantages, pad_id=0)


def _loss_and_grads(policy, micro, algorithm, old):
    policy.zero_grad(set_to_none=True)
    logprobs, _ = token_logprobs(policy, micro, temperature=0.6)
    loss, _ = grpo_loss(logprobs, old_logprobs=old, advantages=micro.advantages,
                        response_mask=micro.response_mask, author_mask=micro.author_mask,
                        algorithm=algorithm, rollout_logprobs=micro.rollout_logprobs)
    loss.backward()
    return logprobs.detach(), loss.detach(), {
        name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}


def test_bf16_compute_stays_within_tolerance_of_fp32_with_fp32_masters(tiny_model_dir):
    algorithm = compose([]).algorithm
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    fp32 = TokenLogprobs(model, chunk_tokens=16)
    bf16 = TokenLogprobs(model, chunk_tokens=16, autocast_dtype=torch.bfloat16)
    micro = _micro_batch()
    with torch.no_grad():  # one set of old log-probs, so the losses differ only by compute
        old = token_logprobs(fp32, micro, temperature=0.6)[0] - 0.05 * micro.response_mask

    logprobs, loss, grads = _loss_and_grads(fp32, micro, algorithm, old)
    logprobs_bf16, loss_bf16, grads_bf16 = _loss_and_grads(bf16, micro, algorithm, old)
    scored = micro.response_mask.bool()

    assert logprobs_bf16.dtype == torch.float32  # the log-softmax is fp32 either way
    assert not torch.equal(logprobs_bf16, logprobs)  # the option really computes in bf16
    assert not torch.equal(loss_bf16, loss)
    moved = (logprobs_bf16 - logprobs)[scored].abs()  # [scored]
    print(f"|logprob diff| max {float(moved.max()):.4f} mean {float(moved.mean()):.4f}, "
          f"loss {float(loss):.5f} vs {float(loss_bf16):.5f}")
    torch.testing.assert_close(logprobs_bf16[scored], logprobs[scored], atol=LOGPROB_ATOL, rtol=0)
    assert float(moved.mean()) < LOGPROB_MEAN_ATOL
    torch.testing.assert_close(loss_bf16, loss, atol=LOSS_ATOL, rtol=0)
    # master weights and their gradients stay fp32, pointing the same way as fp32's
    assert grads.keys() == grads_bf16.keys() and grads
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in grads_bf16.values())
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_bf16 = torch.cat([grads_bf16[n].flatten() for n in grads])
    cosine = float(torch.nn.functional.cosine_similarity(flat, flat_bf16, dim=0))
    print(f"gradient cosine {cosine:.5f}")
    assert cosine > 0.99


def _learner_step(model_dir, dtype: str) -> tuple[dict[str, float], list[float], Learner]:
    """Two updates (the second on recomputed old log-probs) with a frozen reference, at a
    learning rate too small to move an fp32 weight, then `score`."""
    episodes = four_episodes()
    learner = single_rank(model_dir, "optim.lr=1e-30", "algorithm.kl_coef=0.1",
                          f"learner.cpu_compute_dtype={dtype}")
    try:
        metrics = learner.train_step(episodes, ADVANTAGES)
        scores = learner.score([e.prompt_ids + e.response_ids for e in episodes[:2]], [6, 6])
        assert all(p.dtype == torch.float32 for p in learner.model.parameters())
        return metrics, [x for row in scores for x in row], learner
    finally:
        learner.close()


def test_bf16_learner_computes_old_logprobs_reference_and_score_the_same_way(
        tiny_model_dir, monkeypatch):
    """With weights that do not move, the recomputed old log-probs and the reference equal
    the policy's own: ratio 1 and KL 0 in bf16 too, which holds only if every pass shares the
    compute (the loss is then -advantage whatever the log-probs). `score`, the entropy and the
    gap to the rollout's log-probs move within the tolerance above."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: SAPPHIRE_RAPIDS)  # run it here anyway
    fp32, fp32_scores, _ = _learner_step(tiny_model_dir, "float32")
    bf16, bf16_scores, learner = _learner_step(tiny_model_dir, "bfloat16")
    assert learner.policy.autocast_dtype is torch.bfloat16
    assert bf16["train/updates"] == 2
    assert bf16["train/approx_kl"] == 0.0 and bf16["train/clip_frac"] == 0.0
    assert bf16["train/kl_loss"] == 0.0
    for name in ("train/rollout_logprob_gap_mean", "train/entropy"):
        assert bf16[name] != fp32[name]
        assert bf16[name] == pytest.approx(fp32[name], abs=LOGPROB_MEAN_ATOL)
    assert bf16_scores != fp32_scores
    torch.testing.assert_close(torch.tensor(bf16_scores), torch.tensor(fp32_scores),
                               atol=LOGPROB_ATOL, rtol=0)
